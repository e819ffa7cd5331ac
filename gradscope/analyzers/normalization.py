"""Normalization analyzer: ``normalization_drift``.

Rules, per normalization layer:

- eval drift: in evaluation forwards the layer normalizes with its running statistics; if the batch
  statistics of its eval input are far from them (standardized mean gap, |log variance ratio|, typical
  channel), the layer sees a different distribution at eval time than in training.
- train drift: the same gap in training forwards, sustained, means the running statistics do not track
  the data (non-stationary inputs, momentum too small), so evaluation will be off.
- running variance near zero in some channel.
- affine gain collapsing toward zero (from a non-zero start) or exploding.
- the layer's input scale growing without bound over training.

Running statistics start at (0, 1) and lag the data for the first steps by design: the statistics rules
only look at steps from ``norm_warmup_steps`` on.
"""

from __future__ import annotations

import math
from statistics import median

from ..config import Thresholds
from ..findings import Finding, Kind, Severity
from ..stats.history import History
from ..stats.records import NormStats

_HINT_EVAL = (
    "The BatchNorm sees a different distribution at eval time than in training: preprocess eval data "
    "exactly like training data, or recompute the running statistics on data like the eval set."
)
_HINT_TRAIN = (
    "The running statistics do not track the training batches: check for non-stationary inputs, raise the "
    "BatchNorm momentum, or recompute the statistics before evaluating."
)
_HINT_VAR = (
    "A channel with near-zero running variance is constant or dead upstream: check the preceding layer for "
    "dead units, or raise the layer's eps."
)
_HINT_COLLAPSE = (
    "Exclude normalization gains from weight decay, or lower the learning rate for this layer."
)
_HINT_EXPLODE = "Lower the learning rate or clip gradients; exclude the gain from aggressive schedules."
_HINT_GROWTH = (
    "The input to this norm layer keeps growing: use pre-norm residual blocks, add weight decay, or lower "
    "the learning rate."
)


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    found: list[Finding] = []
    for name, info in history.layers.items():
        if info.role != "norm":
            continue
        train = [(r.step, r.norms[name]) for r in history.records if name in r.norms]
        evals = [(r.step, r.eval_norms[name]) for r in history.records if name in r.eval_norms]
        found += _gap(name, evals, thresholds, training=False)
        found += _gap(name, train, thresholds, training=True)
        found += _running_var(name, train + evals, thresholds)
        found += _gain(history, name, train + evals, thresholds)
        found += _input_growth(history, name, train, thresholds)
    return found


def _finding(name: str, severity: Severity, step: int, message: str, hint: str, evidence: dict) -> Finding:
    return Finding(
        kind=Kind.NORMALIZATION_DRIFT.value,
        severity=severity.value,
        layer=name,
        step=step,
        message=message,
        hint=hint,
        evidence=evidence,
    )


def _drifted(n: NormStats, th: Thresholds) -> bool:
    """The typical channel beyond the thresholds, or the worst channels beyond twice them (a shift that
    moves a few channels hides in the mean over all of them; sampling noise of one channel stays below
    2x: a batch of 8 gives a per-channel mean gap of ~0.35 running std, ~1.1 for the worst of 512)."""
    typical = n.mean_gap_mean > th.norm_mean_gap or n.log_var_ratio_mean > th.norm_log_var_ratio
    worst = (math.isfinite(n.mean_gap_max) and n.mean_gap_max > 2 * th.norm_mean_gap) or (
        math.isfinite(n.log_var_ratio_max) and n.log_var_ratio_max > 2 * th.norm_log_var_ratio
    )
    return typical or worst


def _onset(flags: list[bool], th: Thresholds) -> int | None:
    """The first flagged index from which on the flags are sustained (a shift midway through a run counts
    from the shift, not over the whole run), with at least ``min_steps`` flagged."""
    for i, f in enumerate(flags):
        if f:
            tail = flags[i:]
            if sum(tail) >= min(th.min_steps, len(flags)) and sum(tail) / len(tail) >= th.sustained_fraction:
                return i
    return None


def _gap(name: str, entries: list[tuple[int, NormStats]], th: Thresholds, *, training: bool) -> list[Finding]:
    """Batch statistics far from the running statistics, sustained from some step on."""
    judged = [
        (st, n)
        for st, n in entries
        if st >= th.norm_warmup_steps and math.isfinite(n.mean_gap_mean) and math.isfinite(n.log_var_ratio_mean)
    ]
    if not judged:
        return []
    i = _onset([_drifted(n, th) for _, n in judged], th)
    if i is None:
        return []
    over = [(st, n) for st, n in judged[i:] if _drifted(n, th)]
    gap = median(n.mean_gap_mean for _, n in over)
    lvr = median(n.log_var_ratio_mean for _, n in over)
    gap_max = max(n.mean_gap_max for _, n in over)
    lvr_max = max(n.log_var_ratio_max for _, n in over)
    evidence = {
        "mean_gap": gap,
        "log_var_ratio": lvr,
        "mean_gap_max": gap_max,
        "log_var_ratio_max": lvr_max,
        "steps_drifted": len(over),
        "steps": len(judged) - i,
        "mode": "train" if training else "eval",
    }
    where = "training batches" if training else "evaluation inputs"
    if gap > th.norm_mean_gap or lvr > th.norm_log_var_ratio:
        message = (
            f"{name}'s {where} are {gap:.1f} running standard deviations from its running mean with a log "
            f"variance ratio of {lvr:.1f} (typical channel), so its running statistics do not describe them."
        )
    else:
        message = (
            f"In its worst channels, {name}'s {where} are up to {gap_max:.1f} running standard deviations from "
            f"its running mean (log variance ratio up to {lvr_max:.1f}), so its running statistics do not "
            f"describe them."
        )
    if training:
        return [_finding(name, Severity.WARNING, over[0][0], message, _HINT_TRAIN, evidence)]
    severe = gap > 2 * th.norm_mean_gap or lvr > 2 * th.norm_log_var_ratio
    return [_finding(name, Severity.CRITICAL if severe else Severity.WARNING, over[0][0], message, _HINT_EVAL, evidence)]


def _running_var(name: str, entries: list[tuple[int, NormStats]], th: Thresholds) -> list[Finding]:
    judged = [(st, n) for st, n in entries if st >= th.norm_warmup_steps and math.isfinite(n.running_var_min)]
    if not judged:
        return []
    latest = max(judged, key=lambda e: e[0])[1]  # the current state of the running variance
    if latest.running_var_min >= th.norm_min_running_var:
        return []
    first = min(st for st, n in judged if n.running_var_min < th.norm_min_running_var)
    evidence = {"running_var_min": latest.running_var_min, "threshold": th.norm_min_running_var}
    message = f"A channel of {name} has a running variance of {latest.running_var_min:.1e}, next to zero."
    return [_finding(name, Severity.WARNING, first, message, _HINT_VAR, evidence)]


def _gain(history: History, name: str, entries: list[tuple[int, NormStats]], th: Thresholds) -> list[Finding]:
    gains = sorted((st, n.weight_rms) for st, n in entries if n.weight_rms is not None)
    if not gains:
        return []
    start = history.first.norms.get(name) if history.first is not None else None
    initial = start.weight_rms if start is not None and start.weight_rms is not None else gains[0][1]
    latest = gains[-1][1]
    if not math.isfinite(latest):
        return []  # non-finite weights are the numerics analyzer's finding
    evidence = {"gain_rms": latest, "initial_gain_rms": initial}
    # A gain that started at zero (zero-init residual branches) has not collapsed: it was born there.
    # Collapse is judged against the layer's own start (weight decay shrinks a gain of 1 geometrically),
    # and below the absolute floor whatever the start.
    born = initial > 10 * th.norm_gain_collapse
    relative = initial > 0 and latest < th.norm_gain_collapse_ratio * initial
    if born and (latest < th.norm_gain_collapse or relative):
        cut = max(th.norm_gain_collapse, th.norm_gain_collapse_ratio * initial)
        step = next(st for st, g in gains if g < cut)
        evidence["gain_ratio"] = latest / initial
        message = (
            f"{name}'s affine gain collapsed from RMS {initial:.2g} to {latest:.2g} ({latest / initial:.1%} of "
            f"its start), silencing its output."
        )
        return [_finding(name, Severity.WARNING, step, message, _HINT_COLLAPSE, evidence)]
    if latest > th.norm_gain_explode:
        step = next(st for st, g in gains if g > th.norm_gain_explode)
        message = f"{name}'s affine gain grew from RMS {initial:.2g} to {latest:.1e}."
        return [_finding(name, Severity.WARNING, step, message, _HINT_EXPLODE, evidence)]
    return []


def _input_growth(history: History, name: str, entries: list[tuple[int, NormStats]], th: Thresholds) -> list[Finding]:
    """Input RMS up ``norm_input_growth``-fold since the first step, and still rising in the recent window."""
    series = [(st, n.input_rms) for st, n in entries if math.isfinite(n.input_rms)]
    if len(series) < max(th.min_steps, 3):
        return []
    start = history.first.norms.get(name) if history.first is not None else None
    initial = start.input_rms if start is not None and math.isfinite(start.input_rms) else series[0][1]
    latest = series[-1][1]
    if initial <= 0 or latest <= th.norm_input_growth * initial:
        return []
    k = len(series) // 3
    middle = median(v for _, v in series[k : 2 * k]) if k else series[0][1]
    recent = median(v for _, v in series[-k:]) if k else latest
    if recent <= middle:
        return []  # it grew once and settled: bounded
    step = next(st for st, v in series if v > th.norm_input_growth * initial)
    evidence = {"input_rms": latest, "initial_input_rms": initial, "growth": latest / initial}
    message = f"The input to {name} grew {latest / initial:.1e}-fold over training and is still growing."
    return [_finding(name, Severity.WARNING, step, message, _HINT_GROWTH, evidence)]
