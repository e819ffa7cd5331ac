"""`gradscope report LOG_DIR [--json]`: show the report a watched run left in its log_dir."""

from __future__ import annotations

import json
import os
import sys

import click

from gradscope.findings import Report
from gradscope.reporters.json import JSON_NAME, read_document, read_summary

from ._common import fail, handle_errors


@click.command("report")
@click.argument("log_dir", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout, nothing else.")
@click.option("--plot", "plot", metavar="FILE", type=click.Path(dir_okay=False),
              help="Also draw the gradient flow (per-layer gradient norm and update ratio over steps) into "
                   "FILE, a .png or .svg. Needs matplotlib: pip install 'gradscope[plot]'.")
@handle_errors
def report(log_dir: str, as_json: bool, plot: str | None) -> None:
    """Show the report of a run that gradscope.watch(log_dir=LOG_DIR) wrote.

    Exit status: 0 no critical finding, 1 at least one critical finding, 2 no readable report there
    (or a picture that could not be drawn).
    """
    path = os.path.join(log_dir, JSON_NAME) if os.path.isdir(log_dir) else log_dir
    if not os.path.exists(log_dir):
        fail(f"{log_dir}: no such directory")
    if not os.path.isfile(path):
        fail(f"{log_dir}: no {JSON_NAME} here; is it the log_dir of a gradscope.watch(log_dir=...) run?")
    try:
        data = read_document(path)
        result = Report.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"{path}: not a readable gradscope report ({exc})")
        return
    summary = read_summary(path)
    if plot is not None:
        from gradscope.reporters.plot import write_plot

        write_plot(result, os.path.dirname(os.path.abspath(path)), plot)  # UsageError: one line, exit 2
        click.echo(f"gradscope: gradient-flow picture written to {plot}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        from gradscope.reporters.terminal import print_report

        print_report(result, summary=summary)
    sys.exit(0 if result.ok else 1)
