"""`gradscope demo` (to be written)."""

from __future__ import annotations

import click


@click.command("demo")
def demo() -> None:
    """Not yet available."""
    raise click.ClickException("gradscope demo is not available yet")
