"""`gradscope inspect` (to be written)."""

from __future__ import annotations

import click


@click.command("inspect")
def inspect() -> None:
    """Not yet available."""
    raise click.ClickException("gradscope inspect is not available yet")
