"""`gradscope demo [--log-dir DIR]`: small healthy and broken models on synthetic data, and what gradscope finds."""

from __future__ import annotations

import os
import shlex
import time

import click
from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from ._common import handle_errors

DEFAULT_LOG_DIR = "gradscope-demo"


def _names() -> list[str]:
    from gradscope.demo import DEMO

    return list(DEMO)


@click.command("demo")
@click.option("--log-dir", default=DEFAULT_LOG_DIR, show_default=True, type=click.Path(file_okay=False),
              help="TensorBoard logs and gradscope.json of each scenario go to DIR/<scenario>.")
@click.option("--scenario", "names", multiple=True, type=click.Choice(_names()),
              help="Run only this scenario (repeatable). Default: all of them.")
@click.option("--full", is_flag=True, help="Print the full report of every scenario, not a few lines each.")
@handle_errors
def demo(log_dir: str, names: tuple[str, ...], full: bool) -> None:
    """Train small models with and without known problems on synthetic data; show what gradscope finds.

    Nothing is downloaded. Runs in well under a minute on a CPU.
    """
    show_demo(Console(), log_dir, names, full)


def show_demo(console: Console, log_dir: str, names: tuple[str, ...] = (), full: bool = False) -> None:
    """Run the demo scenarios, printing each result as it comes (docs/images is made from this too)."""
    from gradscope.demo import DEMO, Result, run_demo
    from gradscope.reporters.terminal import render_brief, render_report

    count = len(names) if names else len(DEMO)
    console.print(Text(f"gradscope demo · {count} small models on synthetic data · logs in {log_dir}/", style="bold"))
    start = time.perf_counter()

    def show(result: Result) -> None:
        console.print()
        head = Text("✔ " if result.caught else "✗ ", style="green" if result.caught else "red")
        head.append(result.name, style="bold")
        head.append(f"  {result.seconds:.1f} s", style="dim")
        console.print(head)
        console.print(Padding(Text(result.why, style="italic"), (0, 0, 0, 2)))
        if not result.caught:
            wanted = "{} at {}".format(*result.expect) if result.expect else "no warning"
            console.print(Padding(Text(f"expected {wanted}; see the findings below", style="red"), (0, 0, 0, 2)))
        if full:
            render_report(result.report, console, summary=result.summary)
        else:
            render_brief(result.report, console, summary=result.summary, first=result.expect[:1] if result.expect else ())

    import torch

    # The demo's models are tiny: one thread is faster than several, and far faster on a shared, busy CPU
    # (measured: 5 s against 24 s on two loaded cores). Restored after, for callers that run it in-process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_demo(log_dir, list(names) or None, on_result=show)
    finally:
        torch.set_num_threads(threads)
    caught = sum(r.caught for r in results)
    console.print()
    console.print(Text(f"{caught} of {len(results)} scenarios diagnosed as expected in "
                       f"{time.perf_counter() - start:.0f} s.", style="bold"))
    example = next((r for r in results if not r.report.ok), results[-1]).name
    # Commands are printed unwrapped and shell-quoted, so they can be copied as they are.
    console.print(f"Full report of one scenario:  gradscope report {shlex.quote(os.path.join(log_dir, example))}",
                  soft_wrap=True, highlight=False)
    console.print(f"Open the dashboards:          tensorboard --logdir {shlex.quote(log_dir)}",
                  soft_wrap=True, highlight=False)
