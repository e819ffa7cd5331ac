"""Per-layer and run-level summaries of the history: what reporters show beside the findings.

These are descriptive numbers (medians over the recent window), not judgements: analyzers judge.
"""

from __future__ import annotations

import math
from statistics import median
from typing import Any

import numpy as np

from .clipping import clip_summary
from .history import History

#: Collected steps the summary looks back over.
SUMMARY_WINDOW = 10


def _med(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(median(vals)) if vals else None


def _root_sum_sq(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return math.sqrt(sum(v * v for v in vals)) if vals else None


def layer_summary(history: History, window: int = SUMMARY_WINDOW) -> dict[str, dict[str, Any]]:
    """One dict per layer that produced statistics, in model order (see Report.layers)."""
    recent = list(history.records)[-window:]
    order = history.layer_order()
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(history.layers, key=lambda n: order.get(n, 1 << 30)):
        info = history.layers[name]
        acts = [r.activations[name] for r in recent if name in r.activations]
        grads = [r.gradients[name] for r in recent if name in r.gradients]
        pstats = [[r.params[p] for p in info.params if p in r.params] for r in recent]
        pstats = [ps for ps in pstats if ps]
        unmeasured = history.unmeasured.get(name)
        if not acts and not grads and not pstats and unmeasured is None:
            continue
        entry: dict[str, Any] = {"type": info.type, "role": info.role, "order": order.get(name, -1)}
        if unmeasured is not None:
            entry["unmeasured"] = unmeasured  # why gradscope stopped measuring (part of) this layer
        entry["grad_norm"] = _med([g.norm for g in grads])
        entry["act_rms"] = _med([a.rms for a in acts])
        sat = [a.saturated_frac for a in acts if a.saturated_frac is not None]
        entry["saturated_frac"] = _med(sat)
        masks = [a.alive for a in acts if a.alive is not None]
        if masks and all(m.shape == masks[-1].shape for m in masks):
            alive = np.logical_or.reduce(masks)
            entry["dead_frac"] = float(1.0 - alive.mean())
        else:
            entry["dead_frac"] = None
        if pstats:
            entry["param_grad_norm"] = _med([_root_sum_sq([p.grad_norm for p in ps]) for ps in pstats])
            entry["weight_norm"] = _med([_root_sum_sq([p.weight_norm for p in ps]) for ps in pstats])
            ratios = []
            for ps in pstats:
                upd = _root_sum_sq([p.update_norm for p in ps])
                wn = _root_sum_sq([p.weight_norm for p in ps])
                if upd is not None and wn:
                    ratios.append(upd / wn)
            entry["update_ratio"] = _med(ratios)
            entry["lr"] = next((p.lr for p in pstats[-1] if p.lr is not None), None)
        out[name] = entry
    return out


def _thin(points: list, n: int) -> list:
    """At most n points spread evenly over a curve of (step, value): the first, the last, and one per
    stretch in between, a non-finite one when the stretch has any (where a run broke must stay visible)."""
    if len(points) <= n:
        return list(points)
    out = []
    for i in range(n):
        lo, hi = round(i * len(points) / n), round((i + 1) * len(points) / n)
        chunk = points[lo:hi]
        if i == n - 1:
            out.append(points[-1])
            continue
        bad = [p for p in chunk if isinstance(p, (tuple, list)) and not math.isfinite(p[1])]
        out.append(bad[0] if bad and i else chunk[0])
    return out


def run_summary(history: History, curve_points: int = 40) -> dict[str, Any]:
    """Run-level context: the loss curve and the learning-rate schedule of the whole run, thinned for display.

    "First" is where the run began (``History.loss_start``), not the oldest loss the ring still holds:
    a long run summarized from its last thousand steps would hide most of what it learned.
    """
    losses = list(history.losses)
    start = history.loss_start or losses[:1]
    records = list(history.records)
    last = history.last
    curve = _whole(history.loss_curve.points, losses)
    lr_curves = [[[s, v] for s, v in _thin(c.points, curve_points)] for c in history.lr_curves]
    if not lr_curves:  # a history built by hand (tests) without the whole-run curves
        groups = max((len(r.lrs) for r in records), default=0)
        lr_curves = [
            [[r.step, r.lrs[g]] for r in _thin([r for r in records if len(r.lrs) > g], curve_points)]
            for g in range(groups)
        ]
    finite = [v for _, v in losses if math.isfinite(v)]
    low = history.loss_min if history.loss_min is not None else (min(finite) if finite else None)
    return {
        "steps": history.steps_seen,
        "collected": len(records),
        "loss_first": start[0][1] if start else None,
        "loss_first_step": start[0][0] if start else None,
        "loss_last": losses[-1][1] if losses else None,
        "loss_min": low,
        "loss_curve": [[s, v] for s, v in _thin(curve, curve_points)],
        "lrs_first": list(history.first.lrs) if history.first is not None else [],
        "lrs": list(last.lrs) if last is not None else [],
        "lr_curves": lr_curves,
        "skipped_steps": history.skipped_total,
        "clipping": clip_summary(history),
    }


def _whole(curve: list[tuple[int, float]], recent: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The downsampled whole-run curve, ending at the run's latest loss (which thinning may have skipped)."""
    points = list(curve) or list(recent)
    if recent and (not points or recent[-1][0] > points[-1][0]):
        points.append(recent[-1])
    return points
