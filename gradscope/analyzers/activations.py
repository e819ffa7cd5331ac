"""Activation analyzer: ``dead_relu`` and ``saturated_activation``.

Dead units are judged on the per-unit "was non-zero this step" masks OR-ed over the recent collected
steps: a unit counts as dead only if it was exactly zero for every sample of every one of those steps.
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


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    return [*_dead_units(history, thresholds), *_saturation(history, thresholds)]


# --- dead_relu ---------------------------------------------------------------------------------------


def _masks(history: History, layer: str) -> list[tuple[StepRecord, np.ndarray, int]]:
    """(record, alive mask, samples per unit) of the layer's finite steps, oldest first, latest unit count only."""
    out: list[tuple[StepRecord, np.ndarray, int]] = []
    for rec in history.records:
        a = rec.activations.get(layer)
        # A NaN output makes every unit look "dead" (NaN > 0 is False): those steps say nothing.
        if a is None or a.alive is None or a.nonfinite > 0 or a.alive.size == 0:
            continue
        out.append((rec, np.asarray(a.alive, dtype=bool).reshape(-1), a.numel // a.alive.size))
    if out:
        units = out[-1][1].size
        out = [m for m in out if m[1].size == units]  # a width change (shared module) breaks the series
    return out


def _dead_share(history: History, layer: str, th: Thresholds) -> tuple[float, dict[str, float | int | str], int] | None:
    masks = _masks(history, layer)
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


def _dead_units(history: History, th: Thresholds) -> list[Finding]:
    order = history.layer_order()
    hits: dict[str, tuple[float, dict[str, float | int | str], int]] = {}
    for name, info in history.layers.items():
        if info.role in _NO_DEAD_ROLES:
            continue
        hit = _dead_share(history, name, th)
        if hit is not None:
            hits[name] = hit
    found: list[Finding] = []
    flagged = sorted(hits, key=lambda n: order.get(n, 1 << 30))
    for name in flagged:
        role = history.layers[name].role
        if role != "relu":
            # Pooling, reshapes and containers pass dead units through: report them only when no earlier
            # (or inner) module already explains the zeros, e.g. a functional F.relu inside a custom block.
            inherited = any(
                other != name
                and (order.get(other, 1 << 30) < order.get(name, 1 << 30) or other.startswith(name + ".") or name == "")
                for other in flagged
            )
            if inherited:
                continue
        share, evidence, since = hits[name]
        critical = share >= th.dead_critical
        found.append(
            Finding(
                kind=Kind.DEAD_RELU.value,
                severity=(Severity.CRITICAL if critical else Severity.WARNING).value,
                layer=name,
                step=since,
                message=(
                    f"{evidence['dead_units']} of {evidence['units']} units ({share:.0%}) of {name} output "
                    f"exactly zero for every sample over the last {evidence['window_steps']} collected steps."
                ),
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
