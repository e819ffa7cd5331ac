"""`gradscope report` (to be written)."""

from __future__ import annotations

import click


@click.command("report")
def report() -> None:
    """Not yet available."""
    raise click.ClickException("gradscope report is not available yet")
