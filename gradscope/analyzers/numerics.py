"""Numerics analyzer: ``nonfinite``.

One finding for the whole run, at the place NaN/Inf first appeared: the first module in forward order
whose output went non-finite, else the first in backward order whose gradient did, else the parameter's
owner (History keeps that event run-long, beyond the ring). Modules downstream only inherited the values
and are not reported separately.

Mixed precision with ``torch.amp.GradScaler`` overflows gradients on purpose while it calibrates its
scale and skips those optimizer steps; such a gradient overflow is ``info`` unless the skipping persists
(``skipped_steps_persist`` consecutive steps outside the initial calibration), or the non-finite values
reach an applied step, an activation or the weights.
"""

from __future__ import annotations

import math

from ..config import Thresholds
from ..findings import Finding, Kind, Severity
from ..stats.history import History, NonfiniteEvent, _first_nonfinite

_GRAD_SOURCES = frozenset({"gradient", "param_grad"})

_HINTS = {
    "activation": (
        "Guard the operation in this layer against invalid inputs (log/sqrt/division of non-positive "
        "values, exp overflow): clamp its input or add an eps."
    ),
    "gradient": (
        "Clip gradients and lower the learning rate, and look for ops with unbounded derivatives "
        "(sqrt or pow at zero, division) in this layer."
    ),
    "param_grad": "Clip gradients and lower the learning rate; check this layer's ops for unbounded derivatives.",
    "weight": "Lower the learning rate and clip gradients, and restart from a checkpoint taken before this step.",
    "loss": "Make the loss numerically safe: use log_softmax/BCEWithLogits instead of log of probabilities, and clamp divisors.",
}


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    first = history.first_nonfinite
    if first is None:
        return []
    bad_loss = next((st for st, v in history.losses if not math.isfinite(v)), None)
    if bad_loss is not None and bad_loss < first.step:
        # The loss went non-finite on a step whose module statistics were not collected (every > 1):
        # the module seen first, later, only inherited it. Date it by the loss; name no wrong layer.
        return [_uncollected(history, bad_loss, first)]
    skipped = set(history.skipped_steps)
    if not (first.source in _GRAD_SOURCES and first.step in skipped):
        return [_finding(history, first, Severity.CRITICAL)]
    # The first event was a gradient overflow the optimizer never applied: look for one that mattered.
    for rec in history.records:
        if rec.step < first.step:
            continue
        ev = _first_nonfinite(history, rec)
        if ev is None or (ev.source in _GRAD_SOURCES and (rec.skipped or rec.step in skipped)):
            continue
        return [_finding(history, ev, Severity.CRITICAL)]
    return [_overflow(history, first, thresholds)]


def _counts(history: History, ev: NonfiniteEvent) -> dict[str, float | int | str]:
    """NaN/Inf counts at the event, when its record is still in the ring."""
    rec = next((r for r in history.records if r.step == ev.step), None)
    if rec is None:
        return {}
    if ev.source == "activation" and ev.layer in rec.activations:
        a = rec.activations[ev.layer]
        return {"nan": a.nan, "inf": a.inf, "numel": a.numel}
    if ev.source == "gradient" and ev.layer in rec.gradients:
        g = rec.gradients[ev.layer]
        return {"nan": g.nan, "inf": g.inf}
    if ev.source == "loss" and rec.loss is not None:
        return {"loss": rec.loss}
    return {}


def _finding(history: History, ev: NonfiniteEvent, severity: Severity) -> Finding:
    where = ev.layer or "the model"
    messages = {
        "activation": f"The output of {where} became NaN/Inf at step {ev.step}; everything after it inherited it.",
        "gradient": f"The gradient at {where} became NaN/Inf at step {ev.step} although the forward pass was finite.",
        "param_grad": f"The gradient of {ev.param} became NaN/Inf at step {ev.step}.",
        "weight": f"The weights {ev.param} of {where} hold NaN/Inf from step {ev.step}.",
        "loss": f"The loss became NaN/Inf at step {ev.step} while every module output was finite.",
    }
    evidence: dict[str, float | int | str] = {"source": ev.source, **_counts(history, ev)}
    if ev.param:
        evidence["param"] = ev.param
    return Finding(
        kind=Kind.NONFINITE.value,
        severity=severity.value,
        layer=ev.layer,
        step=ev.step,
        message=messages.get(ev.source, f"NaN/Inf appeared at {where} at step {ev.step}."),
        hint=_HINTS.get(ev.source, _HINTS["gradient"]),
        evidence=evidence,
    )


def _runs(steps: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs in sorted step indices: (first step, length)."""
    runs: list[tuple[int, int]] = []
    for st in sorted(set(steps)):
        if runs and st == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((st, 1))
    return runs


def _overflow(history: History, first: NonfiniteEvent, th: Thresholds) -> Finding:
    """Only skipped (never applied) gradient overflows: info, unless the skipping persists."""
    runs = _runs(history.skipped_steps)
    last_step = history.steps_seen - 1
    # GradScaler starts with a large scale and halves it on each overflow: a run of skips from the very
    # first step is it calibrating, by design, unless it never stops.
    judged = [(s, n) for s, n in runs if s > 0 or s + n - 1 >= last_step]
    longest = max((n for _, n in judged), default=0)
    ongoing = any(s + n - 1 >= last_step and n >= th.skipped_steps_persist for s, n in judged)
    if ongoing:
        severity = Severity.CRITICAL
    elif longest >= th.skipped_steps_persist:
        severity = Severity.WARNING
    else:
        severity = Severity.INFO
    f = _finding(history, first, severity)
    longest_any = max((n for _, n in runs), default=0)
    f.message = (
        f"Gradients overflowed at {first.layer or 'the model'} at step {first.step} and the optimizer skipped "
        f"{history.skipped_total} step(s), the longest run {longest_any} in a row."
    )
    f.hint = (
        "Loss-scaling overflow: if the skipping persists, lower the learning rate, clip gradients after "
        "scaler.unscale_(optimizer), or train in bf16."
    )
    f.evidence.update(
        skipped_steps=history.skipped_total,
        longest_skip_run=longest_any,
        longest_run_after_calibration=longest,  # what the severity is judged on
        overflow="skipped",
    )
    return f


def _uncollected(history: History, step: int, seen: NonfiniteEvent) -> Finding:
    return Finding(
        kind=Kind.NONFINITE.value,
        severity=Severity.CRITICAL.value,
        layer="",
        step=step,
        message=(
            f"The loss became NaN/Inf at step {step}, between collected steps; by step {seen.step} it had "
            f"reached {seen.layer or 'the model'}."
        ),
        hint="Re-run with watch(..., every=1) to locate the first module that produces it.",
        evidence={"source": "loss", "first_seen_layer": seen.layer, "first_seen_step": seen.step},
    )
