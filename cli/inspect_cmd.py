"""`gradscope inspect PATH`: diagnose a checkpoint from its weights, optionally with a probe on synthetic input.

Exit status: 0 no critical finding, 1 at least one, 2 bad usage or unreadable input (one line on stderr).
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ._common import fail, handle_errors

#: Checkpoints at least this large get a progress bar on stderr.
PROGRESS_MIN_BYTES = 256 << 20


class _OneLineCommand(click.Command):
    """Usage mistakes print one line on stderr (exit 2), like every other error of this command."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            fail(exc.format_message().splitlines()[0], 2)
            raise  # unreachable: fail() exits


class _ProgressBar:
    """A rich progress bar on stderr, started only once the checkpoint proves to be large."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            if total < PROGRESS_MIN_BYTES:
                return
            self.progress = Progress(TextColumn("reading weights"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("weights", total=total)
        self.progress.update(self.task, completed=done)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@click.command("inspect", cls=_OneLineCommand)
@click.argument("path")
@click.option("--model", "model_spec", metavar="MODULE:CALLABLE",
              help="Build the model (importable from the current directory) for a probe on synthetic input.")
@click.option("--input-shape", metavar="N,C,...", help="Shape of the probe's synthetic input batch.")
@click.option("--input-dtype", metavar="float|long", help="Probe input: normal noise (float) or token ids (long).")
@click.option("--vocab", type=int, metavar="N", help="Token-id range for --input-dtype long.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout, and nothing else.")
@click.option("--log-dir", metavar="DIR", help="Write weight histograms (TensorBoard) and gradscope.json here.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow full pickles. This runs code from the file: only for files you trust.")
@handle_errors
def inspect(path: str, model_spec: str | None, input_shape: str | None, input_dtype: str | None,
            vocab: int | None, as_json: bool, log_dir: str | None, trust_pickle: bool) -> None:
    """Diagnose the checkpoint at PATH: a torch.save file (a state_dict or a dict holding one), a
    .safetensors file, or a folder of shards with its index file. Loads tensors only; never runs code
    from a pickle unless --trust-pickle is given."""
    from gradscope.checkpoint.inspect import inspect as run_inspection

    if trust_pickle:
        click.echo(f"gradscope: warning: --trust-pickle unpickles {path} in full, which runs code from the "
                   "file: only do this for files you trust.", err=True)
    bar = _ProgressBar()
    try:
        result = run_inspection(path, model=model_spec, input_shape=input_shape, input_dtype=input_dtype,
                                vocab=vocab, trust_pickle=trust_pickle, log_dir=log_dir, progress=bar)
    finally:
        bar.close()
    if as_json:
        click.echo(result.report.to_json())
    else:
        from gradscope.checkpoint.render import render_inspection

        render_inspection(result, Console())
    raise SystemExit(0 if result.report.ok else 1)
