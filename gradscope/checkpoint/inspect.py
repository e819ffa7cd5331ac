"""``inspect_checkpoint``: read a checkpoint tensor by tensor, apply the weight-only rules, optionally
run a probe on synthetic input, and return a Report (with a per-layer table in ``Report.layers``)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analyzers import merge
from ..config import Thresholds
from ..errors import CheckpointError, UsageError
from ..findings import Report, sort_findings
from ..hooks.selection import role_of
from . import probe, rules
from .loading import Checkpoint, open_checkpoint
from .weights import TensorStats, tensor_stats

#: Values of one tensor fed to its TensorBoard histogram; larger tensors are sampled with a stride.
HISTOGRAM_SAMPLE = 1 << 20

#: The report's file name inside ``log_dir`` (the same name ``watch(log_dir=...)`` writes).
JSON_NAME = "gradscope.json"

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class Inspection:
    """What one inspection found, with the facts the terminal view shows about the file."""

    report: Report
    path: Path
    format: str
    tensors: int
    total_bytes: int
    seconds: float
    meta: dict[str, Any]


def inspect_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | Callable[[], nn.Module] | str | None = None,
    input_shape: str | Sequence[int] | None = None,
    input_dtype: str | torch.dtype | None = None,
    vocab: int | None = None,
    trust_pickle: bool = False,
    log_dir: str | os.PathLike[str] | None = None,
    thresholds: Thresholds | None = None,
    progress: Progress | None = None,
) -> Report:
    """Diagnose a checkpoint from its weights alone, or also with a probe when ``model`` is given.

    Args:
        path: a torch.save file, a .safetensors file, or a folder of shards with its index.
        model: an nn.Module, a callable returning one, or "MODULE:CALLABLE" (importable from the cwd);
            with ``input_shape`` it runs forward/backward passes (``thresholds.min_steps``, no weight
            update) on synthetic input under ``watch()``.
        input_shape: the probe's input shape, e.g. "8,3,32,32" or (8, 3, 32, 32).
        input_dtype: "float" (normal noise) or "long" (token ids); default: long when the model
            starts with an Embedding.
        vocab: the token-id range for integer input (default: the first Embedding's size).
        trust_pickle: allow full pickles. This RUNS CODE FROM THE FILE: only for files you trust.
        log_dir: write per-tensor weight histograms (TensorBoard) and gradscope.json here.
        thresholds: override the rules' thresholds (see the checkpoint section of Thresholds).
        progress: called as ``progress(bytes_done, bytes_total)`` after each tensor.

    Raises:
        CheckpointError: the file cannot be read safely (exit status 2 on the command line).
        UsageError: bad arguments, or a model that does not fit the checkpoint.
    """
    return inspect(path, model, input_shape, input_dtype, vocab, trust_pickle, log_dir, thresholds,
                   progress).report


def inspect(
    path: str | os.PathLike[str],
    model: nn.Module | Callable[[], nn.Module] | str | None = None,
    input_shape: str | Sequence[int] | None = None,
    input_dtype: str | torch.dtype | None = None,
    vocab: int | None = None,
    trust_pickle: bool = False,
    log_dir: str | os.PathLike[str] | None = None,
    thresholds: Thresholds | None = None,
    progress: Progress | None = None,
) -> Inspection:
    """inspect_checkpoint, returning the Inspection (report plus file facts) the CLI renders."""
    start = time.perf_counter()
    th = thresholds if thresholds is not None else Thresholds()
    if not isinstance(th, Thresholds):
        raise UsageError(f"thresholds must be a gradscope.Thresholds, got {type(th).__name__}")
    if (model is None) != (input_shape is None):
        raise UsageError("--model and --input-shape go together: the probe pass needs both")
    if model is None and (input_dtype is not None or vocab is not None):
        raise UsageError("--input-dtype and --vocab describe the probe's input: they need --model and --input-shape")
    shape = probe.parse_shape(input_shape) if input_shape is not None else None
    # Build the model before reading gigabytes, so that a typo in --model fails at once.
    net = probe.resolve_model(model) if model is not None else None
    ckpt = open_checkpoint(path, trust_pickle=trust_pickle)
    roles = {name: role_of(m) for name, m in net.named_modules()} if net is not None else None

    writer = _open_writer(log_dir) if log_dir is not None else None
    try:
        stats = _read(ckpt, writer, progress)
        findings = rules.analyze(stats, th, ckpt.meta, roles)
        layers = layer_table(stats)
        steps = 0
        if net is not None and shape is not None:
            original = ckpt.state_dict(original_keys=True)
            names = {e.key: e.name for e in ckpt.entries}
            tied = probe.load_strict(net, {names[k]: t for k, t in original.items()}, original, str(ckpt.path))
            if tied:  # said in the view's facts, so a reader knows why those keys were not missing
                ckpt.meta["tied"] = ", ".join(f"{k} = {v}" for k, v in tied.items())
            del original  # the model holds its own copy; let the mapping go
            gen = torch.Generator().manual_seed(0)
            probe.synthetic_input(net, shape, input_dtype, vocab, gen)  # bad dtype/vocab fail before the pass
            probed = probe.run_probe(net, lambda: probe.synthetic_input(net, shape, input_dtype, vocab, gen), th)
            # A checkpoint has no training step (the contract: step None), the probe's findings neither.
            findings += [dataclasses.replace(f, step=None) for f in probed.findings]
            steps = probed.steps
            layers = _merge_layers(layers, probed.layers, [n for n, _ in net.named_modules()])
        order = {name: i for i, name in enumerate(layers)}
        report = Report(findings=sort_findings(merge(findings), order), steps=steps, layers=layers)
        if writer is not None and log_dir is not None:
            _write_report(report, Path(log_dir), writer)
    finally:
        if writer is not None:
            writer.close()
    return Inspection(report, ckpt.path, ckpt.format, len(ckpt.entries), ckpt.total_bytes,
                      time.perf_counter() - start, dict(ckpt.meta))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one thread for the duration (restored after).

    The reductions walk cache-sized blocks, thousands of small ops per GB. Split over threads, every op
    ends in a barrier, and on a busy machine each barrier waits for a descheduled thread: measured 10×
    slower than one thread, which is memory-bound at ~2.5 GB/s anyway (benchmarks/README.md).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read(ckpt: Checkpoint, writer: Any, progress: Progress | None) -> list[TensorStats]:
    """One pass over the tensors; each is reduced (and histogrammed) and dropped before the next."""
    with _one_thread():
        return _read_all(ckpt, writer, progress)


def _read_all(ckpt: Checkpoint, writer: Any, progress: Progress | None) -> list[TensorStats]:
    stats: list[TensorStats] = []
    total, done = ckpt.total_bytes, 0
    if progress is not None:
        progress(0, total)
    for entry, tensor in ckpt.tensors():
        try:
            stats.append(tensor_stats(entry.name, tensor))
        except Exception as exc:  # an exotic tensor type: one line naming it, not a traceback
            raise CheckpointError(f"{ckpt.path}: cannot analyze tensor {entry.name} ({entry.dtype}, "
                                  f"{tensor.layout}): {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if writer is not None:
            _histogram(writer, entry.name, tensor)
        del tensor
        done += entry.nbytes
        if progress is not None:
            progress(done, total)
    return stats


def layer_table(stats: list[TensorStats]) -> dict[str, dict[str, Any]]:
    """Report.layers for a checkpoint: per module, one row per tensor, in checkpoint order."""
    layers: dict[str, dict[str, Any]] = {}
    for s in stats:
        layers.setdefault(s.layer, {"tensors": {}})["tensors"][s.leaf] = s.row()
    return layers


def _merge_layers(weights: dict[str, dict[str, Any]], probed: dict[str, dict[str, Any]],
                  model_order: list[str]) -> dict[str, dict[str, Any]]:
    """Weight rows and probe statistics side by side, in the model's module order."""
    merged = {name: dict(info) for name, info in weights.items()}
    for name, info in probed.items():
        merged.setdefault(name, {}).update(info)
    rank = {name: i for i, name in enumerate(model_order)}
    return dict(sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(rank))))


# --- log_dir -----------------------------------------------------------------------------------------


def _open_writer(log_dir: str | os.PathLike[str]) -> Any:
    try:
        os.makedirs(log_dir, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=os.fspath(log_dir))
    except OSError as exc:
        raise UsageError(f"--log-dir {os.fspath(log_dir)}: cannot write there: {exc.strerror or exc}") from None


def _histogram(writer: Any, name: str, tensor: torch.Tensor) -> None:
    if tensor.numel() == 0 or tensor.is_complex():
        return
    flat = tensor.detach().reshape(-1)
    stride = max(1, math.ceil(flat.numel() / HISTOGRAM_SAMPLE))
    sample = flat[::stride].to(torch.float64)
    sample = sample[torch.isfinite(sample)]  # a histogram of NaN has no bins; the finding says it
    if sample.numel():
        writer.add_histogram(f"weights/{name}", sample.numpy(), global_step=0)


def _write_report(report: Report, log_dir: Path, writer: Any) -> None:
    from ..reporters.tensorboard import findings_markdown

    writer.add_text("gradscope/report", findings_markdown(report), global_step=0)
    text = report.to_json()
    from ..reporters.json import replace_atomically

    try:
        # Atomic (a reader never sees half a report), with the mode the user's umask allows.
        replace_atomically(str(log_dir / JSON_NAME), text)
    except OSError as exc:
        raise UsageError(f"--log-dir {log_dir}: cannot write {JSON_NAME}: {exc.strerror or exc}") from None
