"""Activation analyzer: ``dead_relu`` and ``saturated_activation``.

Dead units are judged on the per-unit "was non-zero this step" masks OR-ed over the recent collected
steps: a unit counts as dead only if it was exactly zero for every sample of every one of those steps.
Masks come from ReLU modules (one series per width when a module is reused at several widths) and, for a
rectifier applied functionally (``F.relu``), from the producing Linear/conv layer: a unit whose output was
never positive and whose output gradient was exactly zero. Activations whose zeros are alive by design
(shrinkage, Threshold, leaky and smooth rectifiers) are never judged.
Ordinary ReLU sparsity (about half the outputs zero per sample) and dropout (random per sample) never
survive that OR, provided enough samples were seen, which is why a minimum sample count gates the rule.

Saturation is the share of a tanh/sigmoid-like module's outputs inside its flat tails, judged on the
recent steps and required for most of them. An output activation (one after which no layer with weights
runs, such as a confident classifier's final sigmoid) saturates by design and is not reported.
"""

from __future__ import annotations

from statistics import median

import numpy as np

from ..config import Thresholds
from ..findings import Finding, Kind, Severity
from ..stats.history import History
from ..stats.records import StepRecord

# Roles that can have dead units of their own. Linear/conv outputs carry a bias and mix inputs, so exact
# zeros there are not "death"; dropout zeroes at random; saturating modules are judged by saturation.
_NO_DEAD_ROLES = frozenset({"dropout", "linear", "norm", "embedding", "recurrent", "saturating"})

# Activations whose zero (or negative) outputs are not death: shrinkage functions are zero in a band around
# 0 by design and pass gradient outside it; Threshold replaces values below a cut-off; the leaky and smooth
# rectifiers give negative inputs a non-zero output or slope. Their units are never claimed dead.
_ALIVE_WHEN_ZERO = frozenset({
    "Hardshrink", "Softshrink", "Tanhshrink", "Threshold", "LeakyReLU", "PReLU", "RReLU",
    "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Softplus",
})


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    return [*_dead_units(history, thresholds), *_saturation(history, thresholds)]


# --- dead_relu ---------------------------------------------------------------------------------------


Masks = list[tuple[StepRecord, np.ndarray, int]]


def _masks(history: History, layer: str) -> dict[int, Masks]:
    """Per unit count: (record, alive mask, samples per unit) of the layer's finite steps, oldest first.

    One ReLU module applied at several widths (a shared ``self.relu``) gives one series per width, so no
    mask is dropped and no width's dead units hide behind another's.
    """
    out: dict[int, Masks] = {}
    for rec in history.records:
        a = rec.activations.get(layer)
        # A NaN output makes every unit look "dead" (NaN > 0 is False): those steps say nothing.
        if a is None or a.nonfinite > 0:
            continue
        by_width = a.alive_by_width or ({} if a.alive is None else {int(a.alive.size): a.alive})
        for alive in by_width.values():
            mask = np.asarray(alive, dtype=bool).reshape(-1)
            if mask.size == 0:
                continue
            # Samples per unit: the share of the step's elements at this width (all of them for one width).
            numel = a.numel if len(by_width) == 1 else a.numel * mask.size // sum(int(np.size(m)) for m in by_width.values())
            out.setdefault(int(mask.size), []).append((rec, mask, max(numel // mask.size, 1)))
    return out


def _unit_masks(history: History, layer: str) -> Masks:
    """Weighted layers: a unit is alive on a step if its pre-activation was positive for some sample or
    any gradient came back through it. Behind any rectifier (an ``F.relu`` in forward() included) a unit
    whose pre-activation is never positive outputs zero and passes back exactly zero gradient."""
    out: Masks = []
    for rec in history.records:
        a, g = rec.activations.get(layer), rec.gradients.get(layer)
        if a is None or g is None or a.unit_max is None or g.unit_absmax is None or a.nonfinite or g.nonfinite:
            continue
        mx, gr = np.asarray(a.unit_max).reshape(-1), np.asarray(g.unit_absmax).reshape(-1)
        if mx.size == 0 or mx.size != gr.size:
            continue
        out.append((rec, (mx > 0) | (gr != 0), max(a.numel // mx.size, 1)))
    return out


Hit = tuple[float, "dict[str, float | int | str]", int]


def _dead_share(masks: Masks, th: Thresholds) -> Hit | None:
    window = masks[-max(int(th.activation_window), 1) :]
    samples = sum(n for _, _, n in window)
    if not window or samples < th.dead_min_samples:
        return None  # too few samples to tell death from ordinary sparsity
    alive = np.logical_or.reduce([m for _, m, _ in window])
    units = alive.size
    dead = int(units - alive.sum())
    share = dead / units
    if share < th.dead_warning:
        return None
    # The step since which they have been dead: extend the OR back through the ring while the share holds.
    since = window[0][0].step
    acc = alive.copy()
    for rec, m, _ in reversed(masks[: len(masks) - len(window)]):
        acc |= m
        if 1 - acc.sum() / units < th.dead_warning:
            break
        since = rec.step
    evidence: dict[str, float | int | str] = {
        "dead_fraction": share,
        "dead_units": dead,
        "units": units,
        "window_steps": len(window),
        "samples": samples,
    }
    return share, evidence, since


def _layer_hit(history: History, layer: str, th: Thresholds) -> Hit | None:
    """The worst width's dead share of a module (every width judged on its own series)."""
    hits = []
    series = _masks(history, layer)
    for width, masks in series.items():
        hit = _dead_share(masks, th)
        if hit is not None:
            if len(series) > 1:
                hit[1]["width"] = width
                hit[1]["widths"] = ", ".join(str(w) for w in sorted(series))
            hits.append(hit)
    return max(hits, key=lambda h: h[0]) if hits else None


def _dead_units(history: History, th: Thresholds) -> list[Finding]:
    order = history.layer_order()
    hits: dict[str, Hit] = {}
    for name, info in history.layers.items():
        if info.role in _NO_DEAD_ROLES or info.type in _ALIVE_WHEN_ZERO:
            continue
        hit = _layer_hit(history, name, th)
        if hit is not None:
            hits[name] = hit
    flagged = sorted(hits, key=lambda n: order.get(n, 1 << 30))
    # Weighted layers whose units are dead behind a rectifier that no module of its own shows (F.relu).
    behind: dict[str, Hit] = {}
    for name, info in history.layers.items():
        if info.role != "linear":
            continue
        hit = _dead_share(_unit_masks(history, name), th)
        if hit is None:
            continue
        at = order.get(name, 1 << 30)
        nxt = min((order.get(n, 1 << 30) for n, i in history.layers.items()
                   if i.role == "linear" and order.get(n, 1 << 30) > at), default=1 << 30)
        # A rectifier module of its own between this layer and the next weighted one: the relu path judges
        # it (and a shrink or leaky activation's zeros are not death); only a functional one is ours here.
        between = [info for info in history.layers.values() if at < order.get(info.name, 1 << 30) < nxt]
        if not any(i.role in ("relu", "saturating") or i.type in _ALIVE_WHEN_ZERO for i in between):
            hit[1]["rectifier"] = "functional"
            behind[name] = hit
    found: list[Finding] = []
    for name in sorted([*flagged, *behind], key=lambda n: order.get(n, 1 << 30)):
        if name in hits and history.layers[name].role != "relu":
            # Pooling, reshapes and containers pass dead units through: report them only when no earlier
            # (or inner) module already explains the zeros, e.g. a functional F.relu inside a custom block.
            inherited = any(
                other != name
                and (order.get(other, 1 << 30) < order.get(name, 1 << 30) or other.startswith(name + ".") or name == "")
                for other in [*flagged, *behind]
            )
            if inherited:
                continue
        share, evidence, since = hits.get(name) or behind[name]
        critical = share >= th.dead_critical
        if name in behind:
            message = (
                f"{evidence['dead_units']} of {evidence['units']} units ({share:.0%}) of {name} never had a "
                f"positive output for any sample and passed back exactly zero gradient over the last "
                f"{evidence['window_steps']} collected steps: dead behind the rectifier that follows it."
            )
        else:
            width = f" at width {evidence['width']}" if "width" in evidence else ""
            message = (
                f"{evidence['dead_units']} of {evidence['units']} units ({share:.0%}) of {name}{width} output "
                f"exactly zero for every sample over the last {evidence['window_steps']} collected steps."
            )
        found.append(
            Finding(
                kind=Kind.DEAD_RELU.value,
                severity=(Severity.CRITICAL if critical else Severity.WARNING).value,
                layer=name,
                step=since,
                message=message,
                hint=(
                    "Use Kaiming/He init and a smaller learning rate, check for a large negative bias, "
                    "or switch to LeakyReLU/GELU so dead units can recover."
                ),
                evidence=evidence,
            )
        )
    return found


# --- saturated_activation ----------------------------------------------------------------------------


def _output_activations(history: History) -> set[str]:
    """Saturating modules after which no layer with weights runs: an output sigmoid saturates by design."""
    last_weighted = max(
        (info.order for info in history.layers.values() if info.params and info.role != "container" and info.order >= 0),
        default=-1,
    )
    return {
        name
        for name, info in history.layers.items()
        if info.role == "saturating" and info.order >= 0 and info.order > last_weighted
    }


def _saturation(history: History, th: Thresholds) -> list[Finding]:
    found: list[Finding] = []
    skip = _output_activations(history)
    for name, info in history.layers.items():
        if info.role != "saturating" or name in skip:
            continue
        full = [
            (rec.step, a.saturated_frac)
            for rec in history.records
            if (a := rec.activations.get(name)) is not None and a.saturated_frac is not None and a.nonfinite == 0
        ]
        series = full[-max(int(th.activation_window), 1) :]
        if not series:
            continue
        fracs = [f for _, f in series]
        over = [(st, f) for st, f in series if f >= th.saturation_warning]
        if len(over) / len(series) < th.sustained_fraction:
            continue  # a passing excursion into the tails is not saturation
        typical = median(fracs)
        if typical < th.saturation_warning:
            continue
        critical = typical >= th.saturation_critical
        # Date it: the start of the run of saturated steps that reaches into the judged window.
        since = over[0][0]
        for st, f in reversed(full[: len(full) - len(series)]):
            if f < th.saturation_warning:
                break
            since = st
        evidence: dict[str, float | int | str] = {
            "saturated_fraction": typical,
            "saturated_max": max(fracs),
            "steps": len(series),
            "steps_saturated": len(over),
        }
        if info.saturation is not None:
            evidence["band_low"], evidence["band_high"] = info.saturation
        found.append(
            Finding(
                kind=Kind.SATURATED_ACTIVATION.value,
                severity=(Severity.CRITICAL if critical else Severity.WARNING).value,
                layer=name,
                step=since,
                message=(
                    f"{typical:.0%} of {name}'s outputs sit in the flat tails of its {info.type}, where almost "
                    f"no gradient passes."
                ),
                hint=(
                    "Scale down the preceding layer's init or learning rate, normalize its input "
                    "(LayerNorm/BatchNorm), or use a non-saturating activation such as ReLU/GELU."
                ),
                evidence=evidence,
            )
        )
    return found
