"""TensorBoard event files: per-layer scalars, a Custom Scalars layout, the findings as Markdown.

Events are written synchronously by this object, not by ``SummaryWriter``'s background thread: an
OSError (disk full, directory removed, no permission) then surfaces here, in the training thread,
where :class:`~gradscope.reporters._safe.WriteGuard` turns it into one warning. The file is opened
for each batch of events, so a removed directory is noticed instead of writing into a deleted inode.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import socket
import time
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import summary as tb_summary

from ..findings import Report
from ..stats.history import History
from ..stats.records import StepRecord
from ._kinds import LAYER_STATS, stats_for
from ._safe import WriteGuard

#: Text tag holding the findings table (TensorBoard shows it as ``gradscope/findings/text_summary``).
FINDINGS_TAG = "gradscope/findings"
STATS_CATEGORY = "gradscope: statistics across layers"
FINDINGS_CATEGORY = "gradscope: findings"

_files = itertools.count()  # two writers in one process in the same second still get distinct files


class TensorBoardWriter:
    """Writes what one scope collects into ``log_dir``; every method is a no-op after a write failed."""

    def __init__(self, log_dir: str | os.PathLike[str], histograms: bool = False) -> None:
        self.log_dir = os.fspath(log_dir)
        self.histograms = histograms
        self._guard = WriteGuard(f"TensorBoard logs to {self.log_dir}")
        self._path = os.path.join(
            self.log_dir,
            f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.{next(_files)}",
        )
        self._stats_seen: set[str] = set()  # statistic prefixes written so far (charts in the layout)
        self._finding_charts: dict[str, list[str]] = {}  # chart title -> tag regexes, from the last report
        self._layout_written: tuple[Any, ...] | None = None
        self._findings_markdown: str | None = None
        self._last_step = 0
        self._loss_step = -1  # the last step whose loss was written
        self._history: History | None = None  # the scope's history, kept to read losses that come late
        self._closed = False
        self._guard.run(self._create)

    @property
    def failed(self) -> bool:
        """True once a write failed; nothing more is written."""
        return self._guard.failed

    def _create(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        # "brain.Event:2" is the file version TensorBoard expects first; it disables step-order purging.
        version = event_pb2.Event(wall_time=time.time(), step=0, file_version="brain.Event:2")
        with open(self._path, "wb") as f:
            RecordWriter(f).write(version.SerializeToString())

    def _emit(self, step: int, summaries: list[summary_pb2.Summary]) -> None:
        self._emit_steps([(step, s) for s in summaries])

    def _emit_steps(self, items: list[tuple[int, summary_pb2.Summary]]) -> None:
        """Append events in one open/close of the file (one syscall batch per collected step)."""
        if self._closed or not items:
            return
        now = time.time()
        events = [event_pb2.Event(wall_time=now, step=step, summary=s) for step, s in items]

        def write() -> None:
            with open(self._path, "ab") as f:
                writer = RecordWriter(f)
                for event in events:
                    writer.write(event.SerializeToString())

        self._guard.run(write)

    # --- per collected step ----------------------------------------------------------------------------

    def write_record(self, history: History, record: StepRecord) -> None:
        """Scalars (and, with ``histograms=True``, sampled histograms) of one collected step."""
        if self._closed or self.failed:
            return
        self._last_step = max(self._last_step, record.step)
        values: list[summary_pb2.Summary.Value] = []
        for stat, layer, value in layer_scalars(history, record):
            values.append(summary_pb2.Summary.Value(tag=f"{stat}/{tag_name(layer)}", simple_value=value))
            self._stats_seen.add(stat)
        for group, lr in enumerate(record.lrs):
            values.append(summary_pb2.Summary.Value(tag=f"lr/group{group}", simple_value=float(lr)))
            self._stats_seen.add("lr")
        summaries = [summary_pb2.Summary(value=values)] if values else []
        if self.histograms:
            summaries.extend(_histograms(record))
        self._emit(record.step, summaries)
        self._history = history
        self._write_losses()
        self._write_layout()

    def _write_losses(self) -> None:
        """The loss of every step that gave one (collected or not), once each, in step order.

        Read from the history rather than the record: the loss of a step is often attached after the
        optimizer step that ended it (``scope.step(loss=...)``), so later than its record.
        """
        if self._history is None:
            return
        new = [(step, loss) for step, loss in list(self._history.losses) if step > self._loss_step]
        if not new:
            return
        value = summary_pb2.Summary.Value
        self._emit_steps([(step, summary_pb2.Summary(value=[value(tag="loss", simple_value=loss)])) for step, loss in new])
        self._loss_step = new[-1][0]
        self._stats_seen.add("loss")

    # --- per report ------------------------------------------------------------------------------------

    def write_report(self, report: Report) -> None:
        """The findings as a Markdown table (rewritten only when they change) and their layout charts."""
        if self._closed or self.failed:
            return
        step = max(self._last_step, report.steps - 1, 0)
        self._write_losses()
        markdown = findings_markdown(report)
        if markdown != self._findings_markdown:
            self._emit(step, [tb_summary.text(FINDINGS_TAG, markdown)])
            if not self.failed:
                self._findings_markdown = markdown
        self._finding_charts = finding_charts(report)
        self._write_layout(step)

    def _write_layout(self, step: int | None = None) -> None:
        """Rewrite the Custom Scalars layout when its charts change (TensorBoard shows the latest one)."""
        key = (tuple(sorted(self._stats_seen)), tuple(sorted((k, tuple(v)) for k, v in self._finding_charts.items())))
        if key == self._layout_written or not self._stats_seen:
            return
        layout: dict[str, dict[str, list[Any]]] = {STATS_CATEGORY: stats_charts(self._stats_seen)}
        if self._finding_charts:
            layout[FINDINGS_CATEGORY] = {t: ["Multiline", tags] for t, tags in self._finding_charts.items()}
        self._emit(self._last_step if step is None else step, [tb_summary.custom_scalars(layout)])
        if not self.failed:
            self._layout_written = key

    def close(self) -> None:
        """Nothing is buffered (each batch is written and closed at once); later calls do nothing."""
        self._closed = True

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- what gets written: pure functions of the records, tested on their own ---------------------------


def tag_name(layer: str) -> str:
    """A layer's name in a tag: the root module ("") is "model"; TensorBoard allows dots in tags."""
    return layer or "model"


def layer_scalars(history: History, record: StepRecord) -> list[tuple[str, str, float]]:
    """``(statistic, layer, value)`` for every per-layer scalar of one record, in model order."""
    out: list[tuple[str, str, float]] = []
    order = history.layer_order()
    layers = sorted(set(record.gradients) | set(record.activations) | set(record.norms) | _param_layers(history, record),
                    key=lambda n: order.get(n, 1 << 30))
    for name in layers:
        info = history.layers.get(name)
        role = info.role if info is not None else "other"
        grad = record.gradients.get(name)
        if grad is not None:
            out.append(("grad_norm", name, grad.norm))
        act = record.activations.get(name)
        if act is not None:
            out.append(("act_rms", name, act.rms))
            if role == "relu" and act.alive is not None and act.alive.size:
                out.append(("dead_frac", name, 1.0 - float(np.mean(act.alive))))
            if act.saturated_frac is not None:
                out.append(("saturated_frac", name, act.saturated_frac))
        params = [record.params[p] for p in (info.params if info else []) if p in record.params]
        updates = [p.update_norm for p in params if p.update_norm is not None]
        if updates:
            # One layer's step over its weights: ||concat(dw)|| / ||concat(w)|| over its own parameters.
            weight = math.sqrt(sum(p.weight_norm**2 for p in params if p.update_norm is not None))
            update = math.sqrt(sum(u * u for u in updates))
            out.append(("update_ratio", name, update / weight if weight > 0 else math.inf))
        grads = [p.grad_norm for p in params if p.grad_norm is not None]
        if params:
            out.append(("param_grad_norm", name, math.sqrt(sum(g * g for g in grads)) if grads else 0.0))
        norm = record.norms.get(name)
        if norm is not None:
            # The larger of the two gaps the drift analyzer judges; NaN (no running stats) is left out.
            gaps = [g for g in (norm.mean_gap_max, norm.log_var_ratio_max) if not math.isnan(g)]
            if gaps:
                out.append(("norm_drift", name, max(gaps)))
    return out


def _param_layers(history: History, record: StepRecord) -> set[str]:
    return {history.params[p].layer for p in record.params if p in history.params}


def _histograms(record: StepRecord) -> list[summary_pb2.Summary]:
    out = []
    for kind, stats in (("activations", record.activations), ("gradients", record.gradients)):
        for layer, s in stats.items():
            if s.sample is None:
                continue
            values = np.asarray(s.sample, dtype=np.float64).ravel()
            values = values[np.isfinite(values)]  # NaN/Inf have no bucket; the nonfinite finding reports them
            if values.size:
                out.append(tb_summary.histogram(f"{kind}/{tag_name(layer)}", values, bins="auto"))
    return out


def stats_charts(stats: set[str]) -> dict[str, list[Any]]:
    """One multi-line chart per statistic, across all layers; loss and learning rate on their own."""
    charts: dict[str, list[Any]] = {}
    for stat in (*LAYER_STATS, "lr"):
        if stat in stats:
            charts[stat] = ["Multiline", [rf"^{stat}/"]]
    if "loss" in stats:
        charts["loss"] = ["Multiline", [r"^loss$"]]
    return charts


def finding_charts(report: Report) -> dict[str, list[str]]:
    """One chart per finding kind: the curves of the statistic that shows it, at every affected layer."""
    charts: dict[str, list[str]] = {}
    for f in report.findings:
        title = f.kind.replace("_", " ")
        tags = charts.setdefault(title, [])
        for stat in stats_for(f.kind):
            tag = "^loss$" if stat == "loss" or not f.layer else f"^{stat}/{re.escape(tag_name(f.layer))}$"
            if tag not in tags:
                tags.append(tag)
    return charts


def findings_markdown(report: Report) -> str:
    """The findings as a Markdown table, most severe first, then each distinct fix once.

    The hints live under the table rather than in a column: TensorBoard sizes table columns by their
    longest text, and a long hint column squeezed the short ones to a letter per line.
    """
    if not report.findings:
        return f"No findings after {report.steps} steps: gradient flow looks healthy."
    lines = [
        f"**{len(report.findings)} finding(s) after {report.steps} steps**",
        "",
        "| severity | kind | layer | step | message |",
        "| --- | --- | --- | --- | --- |",
    ]
    fixes: dict[str, list[str]] = {}  # hint -> the "kind at layer" it fixes, in report order
    for f in report.findings:
        where = f"`{f.layer}`" if f.layer else "(model)"
        cells = [f"**{f.severity}**" if f.severity == "critical" else f.severity, f.kind, where,
                 "" if f.step is None else str(f.step), f.message]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        if f.hint:
            fixes.setdefault(f.hint, []).append(f"{f.kind} at {where}")
    if fixes:
        lines += ["", "**How to fix**", ""]
        lines += [f"- {_cell(hint)} ({', '.join(targets)})" for hint, targets in fixes.items()]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
