"""Gradient-flow analyzer: ``vanishing_gradient`` and ``exploding_gradient``.

Everything here reads the per-parameter gradient norms of *weight matrices* (parameters with two or more
dimensions) of leaf layers, aggregated per layer and divided by the same parameters' weight norm. Biases,
normalization gains and embeddings are left out on purpose: their gradients are legitimately tiny or
sparse, and counting them is the classic source of false alarms. Dividing by the weight norm makes layers
of different widths comparable.

Each rule is gated on a symptom where one can be observed (the loss not improving, the layer's weights not
moving), so that the normal shrinking of gradients as a model converges, or a zero-initialized layer
waking up, is not reported. Steps that the optimizer skipped (GradScaler overflow) are ignored here:
the numerics analyzer owns them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import median

from ..config import Thresholds
from ..findings import Finding, Kind, Severity
from ..stats.history import History

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
        s = LayerSeries()
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


# --- loss symptoms -----------------------------------------------------------------------------------


def loss_change(history: History, since: int | None = None, until: int | None = None) -> float | None:
    """Relative loss improvement over the window: (early mean - late mean) / |early mean|.

    Early and late are the first and last third of the losses given through ``scope.step(loss=...)``.
    ``-inf`` when a loss went non-finite; None when fewer than six losses were given (can't tell).
    """
    pts = [(s, v) for s, v in history.losses if (since is None or s >= since) and (until is None or s < until)]
    if any(not math.isfinite(v) for _, v in pts):
        return -math.inf
    if len(pts) < 6:
        return None
    k = len(pts) // 3
    early = sum(v for _, v in pts[:k]) / k
    late = sum(v for _, v in pts[-k:]) / k
    return (early - late) / max(abs(early), 1e-12)


def loss_not_improving(history: History, th: Thresholds) -> bool | None:
    change = loss_change(history)
    return None if change is None else change < th.loss_plateau


def loss_converged(history: History) -> bool:
    """The loss fell by two orders of magnitude or more: small gradients are convergence, not a fault."""
    change = loss_change(history)
    return change is not None and change >= 0.99


# --- the rules ---------------------------------------------------------------------------------------


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    series = layer_series(history)
    if not series:
        return []
    return [*_vanishing(history, series, thresholds), *_exploding(history, series, thresholds)]


def _vanishing(history: History, series: dict[str, LayerSeries], th: Thresholds) -> list[Finding]:
    found: list[Finding] = []
    plateau = loss_not_improving(history, th)
    converged = loss_converged(history)
    names = list(series)  # forward order
    for i, name in enumerate(names):
        s = series[name]
        ratio = s.ratio
        later = names[i + 1 :]
        # Depth rule: this layer's relative gradient against the largest of any later layer's, per step.
        gaps = _gaps(s, [series[n] for n in later], max)
        below_depth = [(st, gap) for st, gap in gaps if gap < th.vanishing_depth_ratio]
        below_abs = [(st, r) for st, r in zip(s.steps, ratio, strict=True) if r < th.vanishing_ratio]
        depth_hit = bool(gaps) and len(below_depth) / len(gaps) >= th.sustained_fraction
        # Absolute rule; tiny gradients after the loss fell 100-fold are convergence, not a fault.
        abs_hit = len(below_abs) / len(ratio) >= th.sustained_fraction and not converged
        if not depth_hit and not abs_hit:
            continue
        # Symptom gate: when the loss or the updates can be seen, something must actually be stuck.
        upd = s.relative_update()
        ref_upd = max((u for u in (series[n].relative_update() for n in later) if u is not None), default=None)
        stuck = None if upd is None or not ref_upd else upd < th.vanishing_update_gap * ref_upd
        if upd is not None and upd < th.update_ratio_low:
            stuck = True
        if (plateau is not None or stuck is not None) and not (plateau or stuck):
            continue
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
        if plateau is not None:
            evidence["loss_improvement"] = loss_change(history) or 0.0
        critical = abs_hit or (depth_hit and gap < th.vanishing_depth_critical)
        first = min(st for st, _ in (below_abs if abs_hit else []) + (below_depth if depth_hit else []))
        hint = (
            "Use ReLU/GELU with Kaiming/He init instead of saturating activations, or add "
            "normalization or residual connections so gradients reach the early layers."
        )
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
        else:
            message = f"The gradient at {name} is only {rel:.1e} of its weight norm, too small to train it."
        found.append(
            Finding(
                kind=Kind.VANISHING_GRADIENT.value,
                severity=(Severity.CRITICAL if critical else Severity.WARNING).value,
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
    for i, name in enumerate(names):
        s = series[name]
        hit = _growth(s, th) or _ratio_explosion(s, th)
        if hit is None:
            hit = _depth_explosion(s, [series[n] for n in names[i + 1 :]], th)
        if hit is None:
            continue
        onset, sustained, evidence, what = hit
        if not _explosion_symptom(history, onset, th):
            continue
        found.append(
            Finding(
                kind=Kind.EXPLODING_GRADIENT.value,
                severity=(Severity.CRITICAL if sustained else Severity.WARNING).value,
                layer=name,
                step=onset,
                message=f"The gradient at {name} {what}.",
                hint=(
                    "Lower the learning rate (or add warm-up) and clip gradients, e.g. "
                    "torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)."
                ),
                evidence=evidence,
            )
        )
    return found


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
    what = f"grew {growth:.1e}x above its earlier level (from {base:.2e} to {peak:.2e})"
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


def _explosion_symptom(history: History, onset: int, th: Thresholds) -> bool:
    """Does anything besides the gradient say training is in trouble from ``onset`` on?"""
    nf = history.first_nonfinite
    if nf is not None and nf.step >= onset:
        return True
    after = [v for st, v in history.losses if st >= onset]
    prior = [v for st, v in history.losses if st < onset][-5:]
    if after and prior:
        # The loss since the onset is no better than just before it: the big gradients are not helping.
        before_mean = sum(prior) / len(prior)
        change = (before_mean - sum(after) / len(after)) / max(abs(before_mean), 1e-12)
        return change < th.loss_plateau
    if after:
        return loss_not_improving(history, th) is not False
    return True  # no loss given: nothing to gate on, the gradient rule stands alone


def _div(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else 0.0
