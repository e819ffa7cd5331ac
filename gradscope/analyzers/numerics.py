"""Numerics analyzer: ``nonfinite``.

One finding for the whole run, dated at the first step where NaN/Inf appeared anywhere gradscope looks on
every step (the loss, the sentinel's global gradient norm: gradscope/stats/sentinel.py) or on a collected
step (module outputs and gradients, parameters), and placed where it was born (gradscope/stats/birth.py):
in forward, the first module whose inputs were finite and whose output is not; in backward, the module
whose output gradient was finite and whose input (or parameter) gradient is not; the loss function when
every module output was finite and the loss is not. When it first appeared on a step that was not
collected, the finding says so, and localises it at its next collected occurrence (the default schedule
collects the steps after a non-finite loss or gradient norm: gradscope/schedule.py).

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
from ..stats.records import StepRecord

_GRAD_SOURCES = frozenset({"gradient", "param_grad"})

_HINTS = {
    "activation": (
        "Guard the operation in this layer against invalid inputs (log/sqrt/division of non-positive "
        "values, exp overflow, a softmax over a fully masked row): clamp its input or add an eps."
    ),
    "input": "The data fed to the model already holds NaN/Inf: check the input pipeline and its preprocessing.",
    "gradient": (
        "Look for ops with unbounded derivatives in this layer's backward (sqrt or pow at zero, division, a "
        "custom autograd Function), and clip gradients."
    ),
    "param_grad": "Clip gradients and lower the learning rate; check this layer's ops for unbounded derivatives.",
    "weight": "Lower the learning rate and clip gradients, and restart from a checkpoint taken before this step.",
    "loss": (
        "Make the loss numerically safe: log_softmax/BCEWithLogits instead of log of probabilities, clamped "
        "divisors, and no batch whose targets are all ignored (cross-entropy over zero targets is 0/0)."
    ),
}


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    skipped = set(history.skipped_steps)
    located = history.first_located
    if located is None and history.first_nonfinite is not None and history.first_nonfinite.source != "loss":
        located = history.first_nonfinite  # a History filled by hand, before first_located existed
    overflow = None
    if located is not None and located.source in _GRAD_SOURCES and located.step in skipped:
        # A gradient overflow the optimizer never applied (GradScaler): look for one that mattered.
        overflow, located = located, _first_applied(history, located.step, skipped)
    loss_step = _first_bad_loss(history, skipped)
    grad_step = min(
        (s for k, s in history.sentinel.first_nonfinite.items() if k.startswith("grad_norm")), default=None
    )
    dates = [s for s in (loss_step, grad_step, located.step if located else None) if s is not None]
    if not dates:
        return [_overflow(history, overflow, thresholds)] if overflow is not None else []
    step = min(dates)
    if located is not None and located.step == step and loss_step != step and grad_step != step:
        return [_finding(history, located, Severity.CRITICAL)]  # seen first on a collected step
    by = "loss" if loss_step == step else "gradient norm" if grad_step == step else "located"
    rec = _record_at(history, step)
    if by == "loss" and rec is not None and _forward_finite(rec):
        return [_loss_born(history, step, rec)]
    if located is not None and located.step == step:
        return [_finding(history, located, Severity.CRITICAL)]
    return [_uncollected(history, step, by, located)]


def _first_applied(history: History, after: int, skipped: set[int]) -> NonfiniteEvent | None:
    for rec in history.records:
        if rec.step < after:
            continue
        ev = _first_nonfinite(history, rec)
        if (
            ev is None
            or ev.source == "loss"
            or (ev.source in _GRAD_SOURCES and (rec.skipped or rec.step in skipped))
        ):
            continue
        return ev
    return None


def _first_bad_loss(history: History, skipped: set[int]) -> int | None:
    """The first step whose loss was NaN/Inf, but for steps the optimizer skipped (a scaler's overflow)."""
    bad = [s for s, v in (*history.loss_start, *history.losses) if not math.isfinite(v) and s not in skipped]
    ev = history.first_nonfinite
    if ev is not None and ev.source == "loss" and ev.step not in skipped:
        bad.append(ev.step)
    return min(bad, default=None)


def _record_at(history: History, step: int) -> StepRecord | None:
    return next((r for r in history.records if r.step == step), None)


def _forward_finite(rec: StepRecord) -> bool:
    return bool(rec.activations) and all(a.nonfinite == 0 for a in rec.activations.values())


def _counts(history: History, ev: NonfiniteEvent) -> dict[str, float | int | str]:
    """NaN/Inf counts at the event, when its record is still in the ring."""
    rec = _record_at(history, ev.step)
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


def _what(ev: NonfiniteEvent) -> str:
    """Where it was seen, as a phrase: "born in attn's input gradient", "in the weights fc.weight"."""
    where = ev.layer or "the model"
    if ev.source == "weight":
        return f"in the weights {ev.param} of {where}"
    if ev.source == "param_grad":
        return f"{'born in' if ev.born else 'in'} the gradient of {ev.param}"
    if ev.tensor == "input":
        return f"already in the input of {where} (the data)"
    if ev.tensor == "input gradient":
        return (
            f"born in the backward of {where} (its output gradient finite, the gradient it passed back not)"
        )
    if ev.tensor == "output gradient":
        return f"in the gradient of {where}'s output"
    return f"born in {where} (its inputs finite, its output not)" if ev.born else f"in the output of {where}"


def _finding(history: History, ev: NonfiniteEvent, severity: Severity) -> Finding:
    where = ev.layer or "the model"
    messages = {
        "activation": (
            f"The output of {where} became NaN/Inf at step {ev.step} although its inputs were finite; "
            "everything after it inherited it."
            if ev.born
            else f"The output of {where} became NaN/Inf at step {ev.step}; everything after it inherited it."
        ),
        "gradient": (
            f"{where} produced a NaN/Inf gradient in backward at step {ev.step}: the gradient at its output "
            "was finite, the one it passed back to its inputs was not, and the forward was finite."
            if ev.tensor == "input gradient"
            else f"The gradient at {where} became NaN/Inf at step {ev.step} although the forward pass was finite."
        ),
        "param_grad": f"The gradient of {ev.param} became NaN/Inf at step {ev.step}.",
        "weight": f"The weights {ev.param} of {where} hold NaN/Inf from step {ev.step}.",
    }
    if ev.tensor == "input":
        messages["activation"] = f"The input of {where} already held NaN/Inf at step {ev.step}: the data did."
    hint = _HINTS["input"] if ev.tensor == "input" else _HINTS.get(ev.source, _HINTS["gradient"])
    return Finding(
        kind=Kind.NONFINITE.value,
        severity=severity.value,
        layer=ev.layer,
        step=ev.step,
        message=messages.get(ev.source, f"NaN/Inf appeared at {where} at step {ev.step}."),
        hint=hint,
        evidence=_evidence(history, ev),
    )


def _evidence(history: History, ev: NonfiniteEvent) -> dict[str, float | int | str]:
    evidence: dict[str, float | int | str] = {
        "source": ev.source,
        "tensor": ev.tensor or ev.source,
        "step": ev.step,
        "born_here": int(ev.born),
        **_counts(history, ev),
    }
    if ev.param:
        evidence["param"] = ev.param
    return evidence


def _loss_born(history: History, step: int, rec: StepRecord) -> Finding:
    """The loss went non-finite on a collected step whose every module output was finite."""
    evidence: dict[str, float | int | str] = {
        "source": "loss",
        "tensor": "loss",
        "step": step,
        "born_here": 1,
    }
    last = _last_finite_loss(history, step)
    if last is not None:
        evidence["last_finite_loss"] = last
    return Finding(
        kind=Kind.NONFINITE.value,
        severity=Severity.CRITICAL.value,
        layer="",
        step=step,
        message=(
            f"The loss became NaN/Inf at step {step} while every module output was finite: the loss "
            "computation made it (and backward carried it into every gradient)."
        ),
        hint=_HINTS["loss"],
        evidence=evidence,
    )


def _next_loss_birth(history: History, after: int) -> int | None:
    """The first collected step after ``after`` whose loss was NaN/Inf while its module outputs were finite."""
    bad = {s for s, v in (*history.loss_start, *history.losses) if s > after and not math.isfinite(v)}
    for rec in history.records:
        if rec.step in bad and _forward_finite(rec):
            return rec.step
    return None


def _last_finite_loss(history: History, step: int) -> float | None:
    before = [(s, v) for s, v in (*history.loss_start, *history.losses) if s < step and math.isfinite(v)]
    return max(before)[1] if before else None


def _uncollected(history: History, step: int, by: str, located: NonfiniteEvent | None) -> Finding:
    """First seen on a step whose modules were not collected: dated by the loss or the gradient norm."""
    what = "The loss" if by == "loss" else "The global gradient norm"
    evidence: dict[str, float | int | str] = {"source": by, "tensor": by, "step": step, "collected": 0}
    when = f"at step {step}, a step whose modules were not collected"
    if by == "gradient norm":
        # on the CPU the full norm may be read every few steps (stats/sentinel.py): say since when it could be
        since = min(
            (v for k, v in history.sentinel.not_before.items() if history.sentinel.first_nonfinite.get(k) == step),
            default=step,
        )
        if since < step:
            evidence["not_before"] = since
            when = (
                f"at a step from {since} to {step} (on the CPU it is read every few steps), "
                "steps whose modules were not collected"
            )
    last = _last_finite_loss(history, step)
    if last is not None:
        evidence["last_finite_loss"] = last
    again = _next_loss_birth(history, step)
    if again is not None and (located is None or again < located.step):
        # its next collected occurrence was a non-finite loss over finite module outputs
        message = (
            f"{what} became NaN/Inf {when}; at its next "
            f"collected occurrence, step {again}, every module output was finite: the loss computation made it."
        )
        layer, hint = "", _HINTS["loss"]
        evidence.update(first_seen_layer="", first_seen_step=again, first_seen_tensor="loss", born_here=1)
    elif located is None:
        message = (
            f"{what} became NaN/Inf {when}; no collected "
            "step has seen it since."
        )
        layer, hint = "", _HINTS["loss" if by == "loss" else "gradient"]
    else:
        message = (
            f"{what} became NaN/Inf {when}; at its next "
            f"collected occurrence, step {located.step}, it was {_what(located)}."
        )
        # The module is named only where it was seen being born; a weight already NaN says nothing of where.
        layer = located.layer if located.born else ""
        hint = (
            _HINTS["input"] if located.tensor == "input" else _HINTS.get(located.source, _HINTS["gradient"])
        )
        evidence.update(
            first_seen_layer=located.layer,
            first_seen_step=located.step,
            first_seen_tensor=located.tensor or located.source,
            born_here=int(located.born),
        )
        if located.param:
            evidence["param"] = located.param
    return Finding(
        kind=Kind.NONFINITE.value,
        severity=Severity.CRITICAL.value,
        layer=layer,
        step=step,
        message=message,
        hint=hint,
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
