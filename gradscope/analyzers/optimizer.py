"""Optimizer analyzer: ``update_ratio`` and ``loss_divergence``.

``update_ratio`` reads the *real* step the optimizer took, ||w_after - w_before|| / ||w_before||, measured
around ``optimizer.step()`` on collected steps, so it is right for SGD, momentum, Adam/AdamW, weight decay
and any scheduler alike. Per layer it combines the weight matrices (parameters with two or more
dimensions): biases and normalization gains start at 0 or 1 by design and their ratios say more about
the initialization than about the learning rate.

Both directions are judged against the learning-rate schedule and gated on the loss, because warm-up
starts with tiny steps, cosine decay ends with tiny steps, and a high-but-working learning rate is a
choice, not a bug:

- too large: ratio >= ``update_ratio_critical`` sustained is critical (the weights are rewritten every
  step; a warning if the loss improves anyway); >= ``update_ratio_high`` sustained is critical when the
  loss diverges from then on, a warning when it does not improve, and nothing when it improves; a single
  step >= ``update_ratio_critical`` stands alone as a warning (no healthy run takes one), except for a layer
  born at zero.
- too small: the ratio *rescaled to the peak learning rate seen* (ratio * lr_peak / lr) below
  ``update_ratio_low``, sustained, while the loss has not improved over the run: a warning.

``loss_divergence`` (layer ``""``) reads every loss given through ``scope.step(loss=...)``: non-finite
(critical, linked to the ``nonfinite`` layer), a trailing-median rise of ``loss_rise`` x its minimum
(critical), or a single loss far above its recent range (warning). A rise or spike must also give back a
share (``loss_giveback``) of what training had gained, so noise near a converged minimum is not divergence.
The loss is read through ``loss.py``: its baseline is where the run began (the run's first loss), so a
blow-up at step 1 never becomes its own baseline; a level ``loss_rise_over_start`` x that start is a rise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median

from ..config import Thresholds
from ..findings import Finding, Kind, Severity
from ..schedule import departures
from ..stats.history import History
from .loss import Points, loss_points, roughness, start_level
from .loss import change as loss_change
from .loss import level as _level


# --- per-layer update series ------------------------------------------------------------------------
@dataclass
class UpdateSeries:
    """One layer's relative update over the collected, applied steps of the ring."""

    steps: list[int] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)  # ||dw|| / ||w|| of the layer's weight matrices
    lr: list[float | None] = field(default_factory=list)  # the largest lr among those parameters
    adam: list[float | None] = field(default_factory=list)  # RMS of Adam's lr / (sqrt(v_hat) + eps)
    born_zero: bool = False  # weights exactly zero when first seen: its first steps are ~||w|| by design

    @property
    def lr_peak(self) -> float | None:
        lrs = [x for x in self.lr if x is not None and math.isfinite(x)]
        return max(lrs) if lrs else None

    def at_peak(self) -> list[float | None]:
        """Ratios rescaled to the peak lr: what the step would be without the schedule. None at lr == 0."""
        peak = self.lr_peak
        out: list[float | None] = []
        for r, lr in zip(self.ratio, self.lr, strict=True):
            if peak is None or lr is None:
                out.append(r)
            elif lr <= 0 or peak <= 0:
                out.append(None)  # nothing scheduled, nothing to judge
            else:
                out.append(r * peak / lr)
        return out


def update_series(history: History) -> dict[str, UpdateSeries]:
    """Per-layer update series, in model order. Layers whose update was never measured are absent."""
    owned: dict[str, list[str]] = {}
    for pname, info in history.params.items():
        if info.requires_grad and len(info.shape) >= 2 and info.numel > 0 and info.in_optimizer is not False:
            owned.setdefault(info.layer, []).append(pname)
    order = history.layer_order()
    series: dict[str, UpdateSeries] = {}
    for layer in sorted(owned, key=lambda n: order.get(n, 1 << 30)):
        s = UpdateSeries()
        for rec in history.records:
            if rec.skipped:
                continue  # GradScaler skipped it: no update happened (numerics owns it)
            got = [rec.params[p] for p in owned[layer] if p in rec.params and rec.params[p].update_norm is not None]
            if not got:
                continue
            ratio = _ratio(
                math.sqrt(sum(p.update_norm**2 for p in got)),  # type: ignore[operator]
                math.sqrt(sum(p.weight_norm**2 for p in got)),
            )
            if ratio is None:
                continue
            if not s.steps and math.isinf(ratio) and all(p.weight_norm == 0 for p in got):
                s.born_zero = True
            lrs = [p.lr for p in got if p.lr is not None]
            adam = [p.adam_step_rms for p in got if p.adam_step_rms is not None]
            s.steps.append(rec.step)
            s.ratio.append(ratio)
            s.lr.append(max(lrs) if lrs else None)
            s.adam.append(max(adam) if adam else None)
        if s.steps:
            series[layer] = s
    return series


def _ratio(update: float, weight: float) -> float | None:
    """||dw|| / ||w||; None when there is nothing to judge (weights already NaN/Inf, or 0/0)."""
    if not math.isfinite(weight):
        return None  # weights already non-finite: the nonfinite analyzer owns what follows
    if not math.isfinite(update):
        return math.inf  # finite weights, non-finite step: the step itself blew up
    if weight == 0:
        return math.inf if update > 0 else None
    return update / weight


def first_sustained(flags: list[bool], window: int, fraction: float, min_count: int) -> int | None:
    """Index of the first flagged point that opens a sustained episode, or None.

    Sustained: of the ``window`` points starting there (fewer at the end of the ring), at least ``fraction``
    and at least ``min_count`` are flagged. A one-off (the first step of a zero-initialized layer) is not.
    """
    for i, flag in enumerate(flags):
        if not flag:
            continue
        win = flags[i : i + max(window, 1)]
        if sum(win) >= max(min_count, math.ceil(fraction * len(win))):
            return i
    return None


# --- the loss ---------------------------------------------------------------------------------------
def _finite(x: float) -> bool:
    return math.isfinite(x)


@dataclass
class LossEvent:
    """One divergence symptom of the loss curve."""

    how: str  # "nonfinite", "rise" or "spike"
    step: int
    severity: Severity
    evidence: dict[str, float | int | str]


#: The level a rise is measured from is the lowest level over windows this many times ``loss_window``
#: long: the luckiest short stretch of a noisy small-batch loss is not where training "was".
BASELINE_WINDOWS = 4


def find_rise(points: Points, th: Thresholds) -> LossEvent | None:
    """The first point where the loss level (last ``loss_window`` losses) has risen to ``loss_rise`` x the
    lowest level of the long windows before it (for a loss at or below zero: by ``loss_rise - 1`` x its
    magnitude) and given back ``loss_giveback`` of the run's progress. Critical while it has not
    recovered at the end of ``points``; a warning once it has."""
    w = max(int(th.loss_window), 1)
    first = max(2, (w + 1) // 2 - 1)  # judge from half a window on, so early blow-ups are seen early
    vals = [v for _, v in points]
    if len(vals) <= first:
        return None
    level = [_level(vals[max(0, i - w + 1) : i + 1]) for i in range(len(vals))]
    long = [_level(vals[max(0, i - BASELINE_WINDOWS * w + 1) : i + 1]) for i in range(len(vals))]
    # Where training began (the first loss, see loss.start_level), also the first level a rise is measured
    # from: a loss that blows up within the first window is caught too.
    start = start_level(points)
    if start is None:
        return None
    rough = roughness(points)
    # The first level a rise of ``loss_rise`` x is measured from: three losses, robust to one noisy draw.
    first_level = median(vals[:3])

    # Each window's lower quartile: most of its losses, not a noisy cloud straddling the start, are up.
    q1 = [sorted(vals[max(0, i - w + 1) : i + 1])[min(i + 1, w) // 4] for i in range(len(vals))]

    def risen(i: int, low: float) -> bool:
        v = level[i]
        # Well above where the run began for a whole window: the updates made the model worse than untrained.
        over = th.loss_rise_over_start + 2 * rough  # a noisy start is uncertain by about its roughness
        if start > 0 and v >= over * start and q1[i] >= (1 + over) / 2 * start:
            return True
        rise = v - low
        return rise > 0 and rise >= (th.loss_rise - 1) * abs(low) and rise >= th.loss_giveback * (first_level - low)

    low, low_at = first_level, min(1, len(vals) - 1)
    for i in range(first, len(vals)):
        j = i - w  # the long window that ends where the current short window begins
        if j >= first and long[j] < low:
            low, low_at = long[j], j
        if j < first and level[i - 1] < low:
            low, low_at = level[i - 1], i - 1  # too early for long windows: the lowest level so far
        if risen(i, low):
            ev: dict[str, float | int | str] = {
                "loss": level[i], "loss_first": vals[0], "loss_min": low, "loss_min_step": points[low_at][0],
                "rise_factor": level[i] / low if low > 0 else math.inf, "loss_last": level[-1],
            }
            recovered = not risen(len(vals) - 1, low)
            began = _rise_began(points, points[i][0], points[low_at][0], w)
            if began != points[i][0]:
                ev["noticed_step"] = points[i][0]
            return LossEvent("rise", began, Severity.WARNING if recovered else Severity.CRITICAL, ev)
    return None


def _rise_began(points: Points, noticed: int, low_step: int, window: int) -> int:
    """Where a rise began, not where its level crossed the threshold: the first of the last run of steps
    (after the loss's low, within two loss windows of ``noticed``) at which the per-step loss left its
    recent range, by the schedule's own burst rule. A slow drift that never jumps keeps ``noticed``."""
    jumps = {d for d in departures(list(points)) if low_step < d <= noticed and d >= noticed - 2 * window}
    if not jumps:
        return noticed
    began = max(jumps)
    while began - 1 in jumps:  # a blow-up leaves its range step after step: date the first of that run
        began -= 1
    return began


def find_spike(points: Points, th: Thresholds) -> LossEvent | None:
    """The first loss more than ``loss_spike`` x its recent range above the recent median."""
    w = max(int(th.loss_window), 1)
    vals = [v for _, v in points]
    if len(vals) <= w:
        return None
    start = median(vals[:w])
    low = math.inf
    for i in range(w, len(vals)):
        recent = vals[i - w : i]
        low = min(low, *recent)
        mid, spread = median(recent), max(recent) - min(recent)
        # A relative floor keeps a perfectly flat loss from calling its first rounding change a spike.
        spread = max(spread, 1e-3 * abs(mid))
        v = vals[i]
        if v - mid > th.loss_spike * spread and v - low >= th.loss_giveback * (start - low):
            return LossEvent(
                "spike",
                points[i][0],
                Severity.WARNING,
                {"loss": v, "recent_median": mid, "recent_range": max(recent) - min(recent),
                 "spike_over_range": (v - mid) / spread},
            )
    return None


def find_nonfinite(points: Points, history: History) -> LossEvent | None:
    bad = next((i for i, (_, v) in enumerate(points) if not _finite(v)), None)
    if bad is None:
        return None
    step, value = points[bad]
    finite = [v for _, v in points[:bad]]
    ev: dict[str, float | int | str] = {"loss": value}
    if finite:
        ev["last_finite_loss"] = finite[-1]
    nf = history.first_nonfinite
    if nf is not None and nf.layer:
        ev["nonfinite_layer"] = nf.layer
        ev["nonfinite_step"] = nf.step
        ev["nonfinite_source"] = nf.source
    return LossEvent("nonfinite", step, Severity.CRITICAL, ev)


def loss_events(points: Points, history: History, th: Thresholds) -> list[LossEvent]:
    """Every divergence symptom of ``points``; rise and spike are judged on the finite prefix only."""
    nonfinite = find_nonfinite(points, history)
    finite = points if nonfinite is None else [p for p in points if p[0] < nonfinite.step]
    found = [find_rise(finite, th), find_spike(finite, th), nonfinite]
    return [e for e in found if e is not None]


# --- findings ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What every per-layer rule reads: the history, the thresholds, and the loss curve's symptoms."""

    history: History
    th: Thresholds
    events: list[LossEvent]

    def loss_since(self, step: int) -> Points:
        return [(s, v) for s, v in loss_points(self.history) if s >= step]

    def diverges(self, step: int, until: int | None) -> bool:
        """Did the loss rise or go non-finite (a lone spike does not count) from ``step`` until ``until``?"""
        return any(e.how != "spike" and e.step >= step and (until is None or e.step < until) for e in self.events)


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    run = _Run(history, thresholds, loss_events(loss_points(history), history, thresholds))
    findings = [f for layer, s in update_series(history).items() if (f := _update_finding(layer, s, run))]
    div = _divergence_finding(run)
    if div is not None:
        findings.append(div)
    return findings


def _episode_end(s: UpdateSeries, i: int, th: Thresholds) -> int | None:
    """Where the loss must have diverged by to count for the window opening at ``i``: the window's end plus
    one loss window (the loss level lags by that much); None when it runs to the end of the ring."""
    j = i + max(th.update_window, 1)
    return s.steps[j] + th.loss_window if j < len(s.steps) else None


def _update_finding(layer: str, s: UpdateSeries, run: _Run) -> Finding | None:
    big = _too_large(layer, s, run)
    if big is not None and big.severity == Severity.CRITICAL.value:
        return big
    return big or _too_small(layer, s, run)


def _large_episode(s: UpdateSeries, run: _Run) -> tuple[int, Severity, str] | None:
    """Where a too-large episode opens (index), how severe it is, and what the loss did."""
    th = run.th
    win, frac, need = th.update_window, th.sustained_fraction, th.min_steps
    # A single step as large as the weight itself, with the loss diverging right after it: the step that
    # blew the layer up (its gradients may vanish afterwards, so this is never "sustained").
    for i, r in enumerate(s.ratio):
        if r >= th.update_ratio_critical and run.diverges(s.steps[i], _episode_end(s, i, th)):
            return i, Severity.CRITICAL, "diverging"
    i_high = first_sustained([r >= th.update_ratio_high for r in s.ratio], win, frac, need)
    if i_high is None:
        return _one_rewrite(s, th)
    step = s.steps[i_high]
    if run.diverges(step, _episode_end(s, i_high, th)):
        return i_high, Severity.CRITICAL, "diverging"
    change = loss_change(run.loss_since(step))
    improving = change is not None and change >= th.loss_plateau
    i_crit = first_sustained([r >= th.update_ratio_critical for r in s.ratio], win, frac, need)
    if i_crit is not None:
        # Rewritten every step: critical unless the loss improves anyway (then it is only suspicious).
        if improving:
            return i_crit, Severity.WARNING, "improving"
        return i_crit, Severity.CRITICAL, "not improving" if change is not None else "not given"
    if change is not None and not improving:
        return i_high, Severity.WARNING, "not improving"
    return _one_rewrite(s, th)  # large but working (or no loss to tell): a choice, unless one step was huge


def _one_rewrite(s: UpdateSeries, th: Thresholds) -> tuple[int, Severity, str] | None:
    """One step as large as the weights themselves stands alone, whatever the loss does: no healthy run
    takes it (healthy steps are ~1e-3 of the weights; warm-up exists to avoid exactly this)."""
    if s.born_zero:
        return None  # a zero-initialized layer doubles its tiny weights on its second step, by design
    i = next((i for i, r in enumerate(s.ratio) if r >= th.update_ratio_critical), None)
    return None if i is None else (i, Severity.WARNING, "one step")


def _too_large(layer: str, s: UpdateSeries, run: _Run) -> Finding | None:
    th = run.th
    found = _large_episode(s, run)
    if found is None:
        return None
    i, severity, verdict = found
    step, lr = s.steps[i], s.lr[i]
    episode = s.ratio[i : i + th.update_window]
    ev: dict[str, float | int | str] = {
        "update_ratio": episode[0],
        "update_ratio_median": median(episode),
        "update_ratio_max": max(episode),
        "threshold": th.update_ratio_critical if severity == Severity.CRITICAL else th.update_ratio_high,
        "steps_above": sum(r >= th.update_ratio_high for r in episode),
        "window": len(episode),
        "loss": verdict,
    }
    _put_lr(ev, lr, s.lr_peak)
    _put_adam(ev, s, i, len(episode))
    where = f"layer '{layer}'" if layer else "the root module"
    lr_text = f" (now {lr:.3g})" if lr is not None else ""
    loss_text = {"diverging": "the loss diverges", "not improving": "the loss does not improve",
                 "improving": "the loss still improves", "not given": "no loss was given",
                 "one step": "a step as large as the weights rewrites what the layer had learned"}[verdict]
    return Finding(
        kind=Kind.UPDATE_RATIO.value,
        severity=severity,
        layer=layer,
        step=step,
        message=(
            f"From step {step} the optimizer changes {where} by {_fmt(episode[0])} of its weight norm per step "
            f"(||Δw||/||w||, up to {_fmt(max(episode))}; healthy is near 1e-3), and {loss_text}."
        ),
        hint=f"Lower the learning rate for {where}{lr_text}, or add warm-up.",
        evidence=ev,
    )


def _too_small(layer: str, s: UpdateSeries, run: _Run) -> Finding | None:
    th = run.th
    scaled = s.at_peak()
    flags = [r is not None and r <= th.update_ratio_low for r in scaled]
    i = first_sustained(flags, th.update_window, th.sustained_fraction, th.min_steps)
    if i is None:
        return None
    step = s.steps[i]
    lrs = [x for x in s.lr[i:] if x is not None]
    if lrs and lrs[-1] > lrs[0]:
        return None  # the schedule is still warming up: its peak is yet to come, tiny steps are by design
    # "While the loss is not improving": over the whole run and since the tiny steps began.
    overall, since = loss_change(loss_points(run.history)), loss_change(run.loss_since(step))
    if overall is None or since is None or not math.isfinite(overall) or not math.isfinite(since):
        return None
    if overall >= th.loss_plateau or since >= th.loss_plateau or run.diverges(step, None):
        return None
    episode = [r for r in scaled[i : i + th.update_window] if r is not None]
    raw = s.ratio[i : i + th.update_window]
    ev: dict[str, float | int | str] = {
        "update_ratio": median(raw),
        "update_ratio_at_peak_lr": median(episode),
        "threshold": th.update_ratio_low,
        "window": len(episode),
        "loss_change": overall,
    }
    _put_lr(ev, s.lr[i], s.lr_peak)
    _put_adam(ev, s, i, len(raw))
    where = f"layer '{layer}'" if layer else "the root module"
    return Finding(
        kind=Kind.UPDATE_RATIO.value,
        severity=Severity.WARNING,
        layer=layer,
        step=step,
        message=(
            f"Each optimizer step changes {where} by only {_fmt(median(episode))} of its weight norm even "
            f"at the peak learning rate (healthy is near 1e-3), and the loss has not improved."
        ),
        hint=(
            f"The learning rate is too low (peak {s.lr_peak:.3g}), or {where} is effectively frozen: "
            "raise it 10-100x, or check that its gradients arrive."
            if s.lr_peak is not None
            else f"The learning rate is too low, or {where} is effectively frozen: raise it, or check its gradients."
        ),
        evidence=ev,
    )


def _divergence_finding(run: _Run) -> Finding | None:
    events = run.events
    if not events:
        return None
    top = max(e.severity.rank for e in events)
    first = min((e for e in events if e.severity.rank == top), key=lambda e: e.step)
    ev: dict[str, float | int | str] = {"how": first.how, **first.evidence}
    for other in events:
        if other is not first:
            ev[f"{other.how}_step"] = other.step
    return Finding(
        kind=Kind.LOSS_DIVERGENCE.value,
        severity=first.severity,
        layer="",
        step=first.step,
        message=_divergence_message(first),
        hint=_divergence_hint(first),
        evidence=ev,
    )


def _divergence_message(e: LossEvent) -> str:
    ev = e.evidence
    if e.how == "nonfinite":
        where = f", after NaN/Inf first appeared in layer '{ev['nonfinite_layer']}'" if "nonfinite_layer" in ev else ""
        return f"The loss became {ev['loss']} at step {e.step}{where}."
    if e.how == "rise":
        now = "" if e.severity == Severity.CRITICAL else " (it has come back down since)"
        return (
            f"The loss rose from step {e.step} to a level of {_fmt(ev['loss'])} (mean of its recent steps) "
            f"by step {ev.get('noticed_step', e.step)}, "  # type: ignore[arg-type]
            f"{_fmt(ev['rise_factor'])}x its earlier low of {_fmt(ev['loss_min'])} (up to step {ev['loss_min_step']}){now}."  # type: ignore[arg-type]
        )
    return (
        f"The loss spiked to {_fmt(ev['loss'])} at step {e.step}, "  # type: ignore[arg-type]
        f"{_fmt(ev['spike_over_range'])}x its recent range above the recent median {_fmt(ev['recent_median'])}."  # type: ignore[arg-type]
    )


def _divergence_hint(e: LossEvent) -> str:
    if e.how == "nonfinite":
        # A NaN is a numerical fault first (log of zero, a fully masked softmax row, 0/0), not a step size.
        where = f" for layer '{e.evidence['nonfinite_layer']}'" if "nonfinite_layer" in e.evidence else ""
        return f"See the nonfinite finding{where}: fix the operation that produces NaN/Inf there first."
    if e.how == "spike":
        return "Check the batch at that step for bad data, or clip gradients / lower the learning rate if spikes recur."
    return "Lower the learning rate, add warm-up, or clip gradients."


def _put_lr(ev: dict[str, float | int | str], lr: float | None, peak: float | None) -> None:
    if lr is not None:
        ev["lr"] = lr
    if peak is not None:
        ev["lr_peak"] = peak


def _put_adam(ev: dict[str, float | int | str], s: UpdateSeries, i: int, n: int) -> None:
    """Adam's effective per-element learning rate lr / (sqrt(v_hat) + eps), where the engine measured it:
    a huge value means a second moment so small (eps-dominated) that any gradient becomes a huge step."""
    vals = [a for a in s.adam[i : i + n] if a is not None]
    if not vals:
        return
    ev["adam_effective_lr"] = max(vals)
    lr = s.lr[i]
    if lr:
        ev["adam_effective_lr_over_lr"] = max(vals) / lr


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2g}" if abs(x) < 1e4 else f"{x:.1e}"
