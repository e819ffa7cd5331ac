"""Analyzers: pure functions ``(history, thresholds) -> list[Finding]``, one module per family."""

from __future__ import annotations

from collections.abc import Callable

from ..config import Thresholds
from ..findings import Finding, sort_findings
from ..stats.history import History
from . import activations, gradients, initialization, normalization, numerics, optimizer, parameters
from .roots import fold

Analyzer = Callable[[History, Thresholds], list[Finding]]

ANALYZERS: tuple[Analyzer, ...] = (
    numerics.analyze,
    gradients.analyze,
    activations.analyze,
    normalization.analyze,
    parameters.analyze,
    optimizer.analyze,
    initialization.analyze,
)


def merge(findings: list[Finding]) -> list[Finding]:
    """One finding per (kind, layer): keep the most severe, and the earliest step it was seen."""
    best: dict[tuple[str, str], Finding] = {}
    for f in findings:
        key = (f.kind, f.layer)
        old = best.get(key)
        if old is None:
            best[key] = f
            continue
        first = min((s for s in (old.step, f.step) if s is not None), default=None)
        keep = f if f.rank > old.rank else old
        keep.step = first
        best[key] = keep
    return list(best.values())


def analyze(history: History, thresholds: Thresholds | None = None) -> list[Finding]:
    """Run every analyzer; findings merged per (kind, layer), consequences folded into their root cause
    (roots.py), most severe first, then in model order."""
    th = thresholds or Thresholds()
    found: list[Finding] = []
    for analyzer in ANALYZERS:
        found.extend(analyzer(history, th))
    order = history.layer_order()
    return sort_findings(fold(merge(found), order), order)
