"""Gradient-flow analyzer: ``vanishing_gradient`` and ``exploding_gradient``.

Everything here reads the per-parameter gradient norms of *weight matrices* (parameters with two or more
dimensions) of leaf layers, aggregated per layer and divided by the same parameters' weight norm. Biases,
normalization gains and embeddings are left out on purpose: their gradients are legitimately tiny or
sparse, and counting them is the classic source of false alarms. Dividing by the weight norm makes layers
of different widths comparable.

Evidence is graded, never silenced: what no healthy run shows (a gradient 1e3 x its weights, a relative
gradient of 1e-7) stands alone; symptoms (the loss not improving, the layer's weights not moving) set the
severity, and a gate that explains the numbers away (the loss improves, the model converged, the layer
moves as fast as later ones, a zero-initialized layer waking up) lowers a finding to ``info`` with
``evidence["gate"]`` saying which. NaN/Inf is never small: the vanishing rules read only finite steps
before the run's first non-finite value. Steps that the optimizer skipped (GradScaler overflow) are ignored
here: the numerics analyzer owns them. The loss is read through ``loss.py``, as by every rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from statistics import median

from ..config import Thresholds
from ..findings import Finding, Kind, Severity
from ..stats.history import History
from .loss import gate_text, level_rise, loss_points, trend

# Roles whose weights take part: leaf layers with weight matrices. Embeddings get sparse gradients,
# norm layers only gains; containers hold parameters that are rarely "a layer" (e.g. a position table).
_GRADIENT_ROLES = frozenset({"linear", "recurrent", "other"})


@dataclass
class LayerSeries:
    """One layer's weight-gradient statistics over the collected (and applied) steps of the ring."""

    steps: list[int] = field(default_factory=list)
    grad: list[float] = field(default_factory=list)  # L2 norm over the layer's weight matrices
    weight: list[float] = field(default_factory=list)
    update: list[float | None] = field(default_factory=list)  # ||dw||, None when not measured
    numel: int = 0  # elements of the weight matrices

    @property
    def ratio(self) -> list[float]:
        """Gradient norm / weight norm per step (inf for a zero weight with a gradient)."""
        return [_div(g, w) for g, w in zip(self.grad, self.weight, strict=True)]

    def relative_update(self) -> float | None:
        """Median ||dw|| / ||w|| over steps where the update was measured; None when never."""
        vals = [_div(u, w) for u, w in zip(self.update, self.weight, strict=True) if u is not None]
        vals = [v for v in vals if math.isfinite(v)]
        return median(vals) if vals else None


def layer_series(history: History) -> dict[str, LayerSeries]:
    """Per-layer weight-gradient series, in forward order. Layers without any gradient are absent."""
    owned: dict[str, list[str]] = {}
    for pname, info in history.params.items():
        layer = history.layers.get(info.layer)
        if not info.requires_grad or len(info.shape) < 2 or info.numel == 0:
            continue
        if layer is None or layer.role not in _GRADIENT_ROLES:
            continue
        owned.setdefault(info.layer, []).append(pname)
    order = history.layer_order()
    series: dict[str, LayerSeries] = {}
    for layer in sorted(owned, key=lambda n: order.get(n, 1 << 30)):
        s = LayerSeries(numel=sum(history.params[p].numel for p in owned[layer]))
        for rec in history.records:
            if rec.skipped:
                continue
            stats = [rec.params[p] for p in owned[layer] if p in rec.params]
            got = [p for p in stats if p.grad_norm is not None]
            if not got:
                continue  # no gradient arrived: unused_parameter's business, not ours
            s.steps.append(rec.step)
            s.grad.append(math.sqrt(sum(p.grad_norm**2 for p in got)))  # type: ignore[operator]
            s.weight.append(math.sqrt(sum(p.weight_norm**2 for p in got)))
            ups = [p.update_norm for p in got]
            s.update.append(None if any(u is None for u in ups) else math.sqrt(sum(u**2 for u in ups)))  # type: ignore[operator]
        if s.steps:
            series[layer] = s
    return series


# --- the rules ---------------------------------------------------------------------------------------


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    series = layer_series(history)
    if not series:
        return []
    return [*_vanishing(history, series, thresholds), *_exploding(history, series, thresholds)]


def nonfinite_from(history: History) -> int | None:
    """The first step at which anything (a loss, an output, a gradient, a weight) went NaN/Inf."""
    steps = [st for st, v in loss_points(history) if not math.isfinite(v)][:1]
    if history.first_nonfinite is not None:
        steps.append(history.first_nonfinite.step)
    return min(steps) if steps else None


def _finite_before(s: LayerSeries, cut: int | None) -> LayerSeries:
    """The steps a smallness rule may read: finite gradient and weights, before the run's first NaN/Inf.

    NaN is never "small": a NaN gradient compared with anything is False, and a norm read as 0 would
    make every layer after a NaN look vanishing. What follows the first NaN is the nonfinite finding's.
    """
    out = LayerSeries()
    for st, g, w, u in zip(s.steps, s.grad, s.weight, s.update, strict=True):
        if (cut is not None and st >= cut) or not (math.isfinite(g) and math.isfinite(w)):
            continue
        out.steps.append(st)
        out.grad.append(g)
        out.weight.append(w)
        out.update.append(u if u is None or math.isfinite(u) else None)
    return out


_HINT_VANISH = (
    "Use ReLU/GELU with Kaiming/He init instead of saturating activations or Xavier init in a deep "
    "rectifier net, or add normalization or residual connections so gradients reach the early layers."
)


def _vanishing(history: History, full: dict[str, LayerSeries], th: Thresholds) -> list[Finding]:
    found: list[Finding] = []
    cut = nonfinite_from(history)
    series = {n: s for n, s in ((n, _finite_before(s, cut)) for n, s in full.items()) if s.steps}
    loss = trend(history, th, until=cut)
    names = list(series)  # forward order
    for i, name in enumerate(names):
        s = series[name]
        ratio = s.ratio
        later = names[i + 1 :]
        # Depth rule: this layer's relative gradient against the largest of any later layer's, per step.
        gaps = _gaps(s, [series[n] for n in later], max)
        below_depth = [(st, gap) for st, gap in gaps if gap < th.vanishing_depth_ratio]
        below_abs = [(st, r) for st, r in zip(s.steps, ratio, strict=True) if r < th.vanishing_ratio]
        below_stuck = [(st, r) for st, r in zip(s.steps, ratio, strict=True) if r < th.vanishing_stuck_ratio]
        depth_hit = bool(gaps) and len(below_depth) / len(gaps) >= th.sustained_fraction
        abs_hit = len(below_abs) / len(ratio) >= th.sustained_fraction
        # Small everywhere while the loss does not move (a deep plain net under SGD): every layer's step
        # is two orders below the healthy band at any sane learning rate, and nothing improves.
        stuck_hit = loss.stuck is True and len(below_stuck) / len(ratio) >= th.sustained_fraction
        if not (depth_hit or abs_hit or stuck_hit):
            continue
        upd = s.relative_update()
        ref_upd = max((u for u in (series[n].relative_update() for n in later) if u is not None), default=None)
        not_moving = None if upd is None or not ref_upd else upd < th.vanishing_update_gap * ref_upd
        if upd is not None and upd < th.update_ratio_low:
            not_moving = True
        gap = median(g for _, g in gaps) if gaps else math.nan
        rel = median(ratio)
        evidence: dict[str, float | int | str] = {
            "grad_norm": median(s.grad),
            "weight_norm": median(s.weight),
            "grad_to_weight": rel,
            "steps": len(s.steps),
        }
        if gaps:
            evidence["depth_ratio"] = gap
            evidence["reference_layer"] = max(later, key=lambda n: median(series[n].ratio))
        if upd is not None:
            evidence["update_to_weight"] = upd
        if loss.known:
            evidence["loss_improvement"] = loss.change if loss.change is not None else 0.0
        severity = Severity.CRITICAL if abs_hit or (depth_hit and gap < th.vanishing_depth_critical) else Severity.WARNING
        # Symptom gates lower the severity, never drop the finding: when the loss or the updates can be
        # seen and nothing is stuck, small gradients may be a choice (Adam rescales them) or convergence.
        gate = ""
        if loss.converged and not (depth_hit or not_moving):
            gate = "the loss fell 100-fold (gradients shrink as a model converges)"
        elif (loss.known or not_moving is not None) and not (loss.stuck or not_moving):
            gate = f"{gate_text(loss)} and the layer's weights keep moving"
        elif not_moving is False and severity != Severity.CRITICAL:
            # "Too small to train it" is false of a layer that moves as fast as later layers: its optimizer
            # rescales the gradient (Adam). A healthy BERT on its initial loss plateau has queries and keys
            # at 5e-5 of later layers (second-order gradients while attention is uniform), moving normally.
            gate = "the layer's weights move as fast as later layers' (its optimizer rescales the gradient)"

        if gate:
            severity = Severity.INFO
            evidence["gate"] = gate
        flagged = (below_abs if abs_hit else []) + (below_depth if depth_hit else []) + (below_stuck if stuck_hit else [])
        first = min(st for st, _ in flagged)
        hint = _HINT_VANISH
        if all(g == 0.0 for g in s.grad):
            # Not a long chain of small factors but a cut: nothing downstream passes gradient back.
            message = f"{name} received exactly zero gradient on every collected step, so it cannot train."
            hint = (
                "An exactly-zero gradient means the path back from the loss is cut: look for dead ReLU "
                "units after this layer (dead_relu) or an output that does not depend on it."
            )
        elif depth_hit:
            message = (
                f"Gradients reaching {name} are {gap:.1e} times those of later layers (relative to their "
                f"weights), too small to train it."
            )
        elif abs_hit:
            message = f"The gradient at {name} is only {rel:.1e} of its weight norm, too small to train it."
        else:
            message = (
                f"The gradient at {name} is only {rel:.1e} of its weight norm while the loss does not improve, "
                f"too small to train it."
            )
        if gate:
            message = message[:-1] + f", but {gate}."
        found.append(
            Finding(
                kind=Kind.VANISHING_GRADIENT.value,
                severity=severity.value,
                layer=name,
                step=first,
                message=message,
                hint=hint,
                evidence=evidence,
            )
        )
    return found


def _gaps(
    s: LayerSeries, later: list[LayerSeries], reduce: Callable[[list[float]], float]
) -> list[tuple[int, float]]:
    """Per step: this layer's grad/weight divided by ``reduce`` of the later layers' on the same step."""
    by_step = [dict(zip(r.steps, r.ratio, strict=True)) for r in later]
    gaps: list[tuple[int, float]] = []
    for st, r in zip(s.steps, s.ratio, strict=True):
        others = [m[st] for m in by_step if st in m and math.isfinite(m[st]) and m[st] > 0]
        if others and math.isfinite(r):
            gaps.append((st, r / reduce(others)))
    return gaps


def _exploding(history: History, series: dict[str, LayerSeries], th: Thresholds) -> list[Finding]:
    found: list[Finding] = []
    names = list(series)
    clipped = _clip_hidden(history, series, th)  # one run-wide verdict, naming at most one layer
    for i, name in enumerate(names):
        s = series[name]
        # A layer born near zero (zero-init residual branches, ReZero) has gradients far above its weights
        # while it wakes up: then the ratio does not stand alone.
        waking = _weight_growth(s) >= th.exploding_waking_growth and _first_rms(s) < th.exploding_waking_rms
        hits = [(_growth(s, th), False), (_ratio_explosion(s, th), not waking), (_steady_growth(history, s, th), False)]
        graded = [(_grade(hit, th, history, standalone=alone), hit) for hit, alone in hits if hit is not None]
        if clipped is not None and clipped[0] == name:
            graded.append((clipped[1], clipped[2]))
        if not graded:
            hit = _depth_explosion(s, [series[n] for n in names[i + 1 :]], th)
            if hit is None:
                continue
            graded = [(_grade(hit, th, history, standalone=False), hit)]
        severity, (onset, _, evidence, what) = max(graded, key=lambda g: g[0].rank)  # first of the worst
        if severity == Severity.INFO:
            evidence["gate"] = "the loss kept improving since the gradient rose"
        found.append(
            Finding(
                kind=Kind.EXPLODING_GRADIENT.value,
                severity=severity.value,
                layer=name,
                step=onset,
                message=f"The gradient at {name} {what}.",
                hint=(
                    "Check that optimizer.zero_grad() runs every step (gradients accumulate otherwise); "
                    "else lower the learning rate and clip gradients, e.g. "
                    "torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)."
                    if evidence.get("pattern") == "steady"
                    else "The clip hides an explosion at this layer: fix its cause (a recurrent matrix with "
                    "spectral radius above 1, a too-large learning rate or init) rather than relying on "
                    "clip_grad_norm_; for RNNs use an orthogonal init, an LSTM/GRU or fewer time steps."
                    if evidence.get("pattern") == "clipped"
                    else "Lower the learning rate (or add warm-up) and clip gradients, e.g. "
                    "torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)."
                ),
                evidence=evidence,
            )
        )
    return found


def _weight_growth(s: LayerSeries) -> float:
    """How many times the layer's weight norm grew from its first collected step to its largest since."""
    w = [x for x in s.weight if math.isfinite(x)]
    if not w:
        return 1.0
    return max(w) / w[0] if w[0] > 0 else math.inf


def _first_rms(s: LayerSeries) -> float:
    """RMS of the layer's weights (per element) when first collected."""
    return s.weight[0] / math.sqrt(s.numel) if s.numel else math.inf


def _grade(hit: _Hit, th: Thresholds, history: History, *, standalone: bool) -> Severity:
    """Severity of one explosion rule's hit.

    Three orders of magnitude above the weights (``standalone``) is never healthy, whatever the loss does
    (Adam normalizes such gradients away, so the loss may still fall): it stands alone, and the loss only
    sets how bad it is. The other rules are lowered to info when the loss kept improving.
    """
    onset, sustained, _, _ = hit
    symptom = _explosion_symptom(history, onset, th)
    if standalone:
        return Severity.CRITICAL if sustained and symptom else Severity.WARNING
    if not symptom:
        return Severity.INFO
    return Severity.CRITICAL if sustained else Severity.WARNING


def _steady_growth(history: History, s: LayerSeries, th: Thresholds) -> _Hit | None:
    """Growing over the run, ``exploding_steady_growth``-fold from the first collected step to the late
    steps, while the loss does not improve (or its level rises off its low): what gradients summed over
    steps look like when ``zero_grad()`` is never called (nanoGPT: the embedding's 1.1 -> 150)."""
    pts = [(st, g) for st, g in zip(s.steps, s.grad, strict=True) if math.isfinite(g) and g > 0]
    if len(pts) < max(th.min_steps, 5):
        return None
    if _div(pts[0][1], s.weight[s.steps.index(pts[0][0])]) < th.vanishing_stuck_ratio:
        return None  # growing out of a vanishing start (a deep net slowly waking up) is not an explosion
    k = max(len(pts) // 3, 1)
    early, late = median(g for _, g in pts[:k]), median(g for _, g in pts[-k:])
    growth = late / pts[0][1]
    ups = sum(b[1] > a[1] for a, b in pairwise(pts))
    # Steady: most steps up, and the late third well above the early third (not one jump and a plateau
    # from the first step's unusually small gradient).
    if growth < th.exploding_steady_growth or late < 2 * early or ups / (len(pts) - 1) < th.exploding_steady_share:
        return None
    rise = level_rise(history, th)
    stuck = trend(history, th, since=pts[0][0]).stuck
    if not (stuck or (rise is not None and rise >= th.loss_level_rise)):
        return None
    evidence: dict[str, float | int | str] = {
        "grad_norm": pts[-1][1],
        "first_grad_norm": pts[0][1],
        "growth": growth,
        "steps_growing": ups,
        "steps": len(pts),
        "pattern": "steady",
    }
    if rise is not None:
        evidence["loss_level_rise"] = rise
    what = (
        f"grew {growth:.0f}x over the run (up on {ups} of {len(pts) - 1} collected steps) while the loss "
        f"did not improve"
    )
    return pts[0][0], True, evidence, what


_Hit = tuple[int, bool, "dict[str, float | int | str]", str]


def _persistence(flags: list[bool], th: Thresholds) -> bool:
    """Sustained: from the first flagged step on, most steps are flagged, and at least min_steps of them."""
    start = flags.index(True)
    tail = flags[start:]
    return sum(tail) >= min(th.min_steps, len(flags)) and sum(tail) / len(tail) >= th.sustained_fraction


def _growth(s: LayerSeries, th: Thresholds) -> _Hit | None:
    """Step over step: gradient norm above ``exploding_growth`` x the median of the steps before it."""
    flags: list[bool] = []
    base_at: list[float] = []
    for t, g in enumerate(s.grad):
        prev = [x for x in s.grad[:t] if math.isfinite(x) and x > 0]
        if len(prev) < th.min_steps:
            flags.append(False)
            base_at.append(math.nan)
            continue
        base = median(prev)
        # A baseline that was itself vanishing (a zero-initialized layer waking up) is no reference.
        healthy_base = _div(base, median(s.weight[:t])) >= th.vanishing_ratio
        flags.append(healthy_base and g > th.exploding_growth * base)  # +inf counts, NaN does not
        base_at.append(base)
    if not any(flags):
        return None
    first = flags.index(True)
    base = base_at[first]
    # A gradient that keeps growing until it turns NaN has not recovered: the NaN steps count as above.
    flags[first:] = [f or math.isnan(g) for f, g in zip(flags[first:], s.grad[first:], strict=True)]
    # When did it begin? Walk back over the contiguous run of steps already clearly above the baseline.
    start = first
    while start > 0 and s.grad[start - 1] > 2 * base:
        start -= 1
    peak = max(g for g in s.grad[first:] if not math.isnan(g))
    growth = peak / base
    evidence: dict[str, float | int | str] = {
        "grad_norm": peak,
        "baseline_grad_norm": base,
        "growth": growth,
        "steps_above": sum(flags),
    }
    what = (
        f"grew {growth:.1e}x above its earlier level (from {base:.2e} to {peak:.2e})"
        if math.isfinite(peak)
        else f"grew from its earlier level of {base:.2e} until it overflowed to inf"
    )
    return s.steps[start], _persistence(flags, th), evidence, what


def _ratio_explosion(s: LayerSeries, th: Thresholds) -> _Hit | None:
    """Gradient norm above ``exploding_ratio`` x the weight norm."""
    ratio = s.ratio
    flags = [r > th.exploding_ratio and s.weight[k] > 0 for k, r in enumerate(ratio)]
    if not any(flags):
        return None
    first = flags.index(True)
    worst = max(r for r, f in zip(ratio, flags, strict=True) if f)
    evidence: dict[str, float | int | str] = {
        "grad_to_weight": worst,
        "grad_norm": max(g for g, f in zip(s.grad, flags, strict=True) if f),
        "weight_norm": s.weight[first],
        "steps_above": sum(flags),
    }
    return s.steps[first], _persistence(flags, th), evidence, f"reached {worst:.1e}x its weight norm"


def _depth_explosion(s: LayerSeries, later: list[LayerSeries], th: Thresholds) -> _Hit | None:
    """Layer over layer: relative gradient ``exploding_depth_ratio`` x above the later layers' median."""
    gaps = _gaps(s, later, median)
    flags = [g > th.exploding_depth_ratio for _, g in gaps]
    if not gaps or sum(flags) / len(flags) < th.sustained_fraction:
        return None
    gap = median(g for _, g in gaps)
    first = gaps[flags.index(True)][0]
    evidence: dict[str, float | int | str] = {"depth_ratio": gap, "steps_above": sum(flags)}
    return first, False, evidence, f"is {gap:.1e}x the later layers' (relative to their weights)"


def _clip_hidden(
    history: History, series: dict[str, LayerSeries], th: Thresholds
) -> tuple[str, Severity, _Hit] | None:
    """An explosion the user's clip hides: the clip shrinks the global gradient ``clip_hidden_ratio``-fold
    or more on most collected steps, and this layer holds most of the pre-clip gradient and the largest
    gradient relative to its weights. Gradients are read as backward produced them (before the clip), so
    the layer that explodes is named, not the one whose clipped gradient looks largest afterwards."""
    steps = [r for r in history.records if not r.skipped and r.clip_ratio is not None]
    if len(steps) < th.min_steps:
        return None
    ratios = [r.clip_ratio for r in steps]
    hidden = [x >= th.clip_hidden_ratio for x in ratios]  # NaN counts as not clipped: nonfinite owns it
    if sum(hidden) / len(hidden) < th.sustained_fraction:
        return None
    # The layer that explodes: the largest median relative gradient, holding most of the squared norm.
    rel = {n: median(x for x in ser.ratio if math.isfinite(x)) for n, ser in series.items()
           if any(math.isfinite(x) for x in ser.ratio)}
    if not rel:
        return None
    name = max(rel, key=rel.__getitem__)
    s = series[name]
    total = {r.step: sum(p.grad_norm**2 for p in r.params.values() if p.grad_norm is not None and
                         math.isfinite(p.grad_norm)) for r in steps}
    shares = [g * g / total[st] for st, g in zip(s.steps, s.grad, strict=True)
              if total.get(st) and math.isfinite(g)]
    if not shares or median(shares) < 0.5:
        return None
    clipped = [x for x, h in zip(ratios, hidden, strict=True) if h]
    typical = median(clipped)
    onset = steps[hidden.index(True)].step
    symptom = _explosion_symptom(history, onset, th)
    severity = Severity.CRITICAL if typical >= th.clip_hidden_critical and symptom else Severity.WARNING
    evidence: dict[str, float | int | str] = {
        "clip_ratio": typical,
        "max_clip_ratio": max(clipped),
        "steps_clipped": len(clipped),
        "steps": len(steps),
        "grad_norm": median(s.grad),
        "grad_to_weight": rel[name],
        "share_of_grad_norm_sq": median(shares),
        "pattern": "clipped",
    }
    what = (
        f"is what gradient clipping keeps cutting: before the clip it holds {median(shares):.0%} of the "
        f"gradient, which the clip shrank {typical:.0f}x (median) on {len(clipped)} of {len(steps)} collected steps"
    )
    return name, severity, (onset, True, evidence, what)


def _explosion_symptom(history: History, onset: int, th: Thresholds) -> bool:
    """Does anything besides the gradient say training is in trouble from ``onset`` on?"""
    nf = nonfinite_from(history)
    if nf is not None and nf >= onset:
        return True
    pts = loss_points(history)
    after = [v for st, v in pts if st >= onset]
    prior = [v for st, v in pts if st < onset][-5:]
    if after and prior:
        # The loss since the onset is no better than just before it: the big gradients are not helping.
        before_mean = sum(prior) / len(prior)
        change = (before_mean - sum(after) / len(after)) / max(abs(before_mean), 1e-12)
        return change < th.loss_plateau
    if after:
        return trend(history, th).stuck is not False
    return True  # no loss given: nothing to gate on, the gradient rule stands alone


def _div(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else 0.0
