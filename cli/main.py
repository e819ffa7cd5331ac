"""Entry point of the `gradscope` console script: one click group, one module per command."""

from __future__ import annotations

import click

from gradscope import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradscope")
def cli() -> None:
    """Gradient-flow diagnostics for PyTorch models and checkpoints."""


def _register() -> None:
    # Imported here so that `gradscope --help` stays fast and one broken command cannot hide the others.
    from .demo_cmd import demo
    from .inspect_cmd import inspect
    from .report_cmd import report

    cli.add_command(inspect)
    cli.add_command(report)
    cli.add_command(demo)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
