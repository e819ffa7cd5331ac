"""Initialization analyzer: ``init_scale``.

A model that starts with weights far too large is confidently wrong before it has seen any data: its
logits are large, so its first cross-entropy loss sits far above ln(C), the loss of an uninformed guess
over the C outputs of its last layer (nanoGPT with init std 1.0 instead of 0.02: a first loss of 36.4
where ln(95) = 4.55, activations with an RMS of ~11). The first steps then go into shrinking the weights
instead of learning. Two readings, on the first collected step:

- the first loss is ``init_loss_ratio`` x ln(C) or more *and* the output layer's RMS is at least
  ``init_logit_rms`` (a regression with large targets has a large first loss but small outputs);
- the RMS of weighted layers' outputs grows layer over layer: the last is ``init_growth`` x the first
  or more (each layer multiplies its input's scale instead of keeping it).
"""

from __future__ import annotations

import math

from ..config import Thresholds
from ..findings import Finding, Kind, Severity
from ..stats.history import History
from .loss import loss_points

_WEIGHTED = frozenset({"linear"})

_HINT = (
    "Initialize with a smaller scale (nanoGPT/GPT-2: normal std 0.02; else the framework default or "
    "Kaiming/Xavier for the fan-in), and scale residual projections by 1/sqrt(2 * n_layers)."
)


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    first = history.first
    if first is None:
        return []
    order = history.layer_order()
    weighted = sorted(
        (n for n, info in history.layers.items() if info.role in _WEIGHTED and info.order >= 0 and n in first.activations),
        key=lambda n: order.get(n, 1 << 30),
    )
    weighted = [n for n in weighted if math.isfinite(first.activations[n].rms)]
    if not weighted:
        return []
    found = _first_loss(history, weighted[-1], thresholds)
    if found is None:
        found = _growth(history, weighted, thresholds)
    if found is None:
        return []
    loudest = max(weighted, key=lambda n: first.activations[n].rms)
    found.evidence["largest_activation_rms"] = first.activations[loudest].rms
    found.evidence["largest_activation_layer"] = loudest
    return [found]


def output_width(history: History, layer: str) -> int | None:
    """Units of the output layer: its recorded per-unit statistics, else its weight's first dimension,
    else (a head tied to the input embedding, as in GPT-2 and nanoGPT) the largest embedding's rows."""
    first = history.first
    a = first.activations.get(layer) if first is not None else None
    if a is not None and a.unit_max is not None and a.unit_max.size:
        return int(a.unit_max.size)
    info = history.layers.get(layer)
    own = [history.params[p] for p in (info.params if info is not None else []) if p in history.params]
    for p in own:
        if len(p.shape) == 2 and p.name.endswith("weight"):
            return int(p.shape[0])
    if info is not None and not own:  # its weight is known under the embedding's name (tied)
        rows = [p.shape[0] for p in history.params.values()
                if len(p.shape) == 2 and history.layers.get(p.layer) is not None
                and history.layers[p.layer].role == "embedding"]
        return int(max(rows)) if rows else None
    return None


def _first_loss(history: History, head: str, th: Thresholds) -> Finding | None:
    pts = loss_points(history)
    width = output_width(history, head)
    if not pts or width is None or width < 2 or not math.isfinite(pts[0][1]):
        return None
    step, loss = pts[0]
    uninformed = math.log(width)
    rms = history.first.activations[head].rms  # type: ignore[union-attr]
    if loss < th.init_loss_ratio * uninformed or rms < th.init_logit_rms:
        return None
    return Finding(
        kind=Kind.INIT_SCALE.value,
        severity=Severity.WARNING.value,
        layer=head,
        step=step,
        message=(
            f"The first loss is {loss:.3g}, {loss / uninformed:.1f}x ln({width}) = {uninformed:.2f}, the loss of "
            f"an uninformed guess over {head}'s {width} outputs: the model starts confidently wrong "
            f"(output RMS {rms:.3g}), a sign of weights initialized far too large."
        ),
        hint=_HINT,
        evidence={"loss_first": loss, "uninformed_loss": uninformed, "outputs": width,
                  "loss_over_uninformed": loss / uninformed, "output_rms": rms},
    )


def _growth(history: History, weighted: list[str], th: Thresholds) -> Finding | None:
    first = history.first
    assert first is not None
    rms = [(n, first.activations[n].rms) for n in weighted]
    start = next(((n, r) for n, r in rms if r > 0), None)
    if start is None or len(rms) < 3:
        return None
    peak = max(rms, key=lambda t: t[1])
    growth = peak[1] / start[1]
    if growth < th.init_growth or peak[1] < th.init_logit_rms:
        return None
    return Finding(
        kind=Kind.INIT_SCALE.value,
        severity=Severity.WARNING.value,
        layer=peak[0],
        step=first.step,
        message=(
            f"At the first step the outputs of weighted layers grow {growth:.3g}x layer over layer, from RMS "
            f"{start[1]:.3g} at {start[0]} to {peak[1]:.3g} at {peak[0]}: the initialization amplifies the signal."
        ),
        hint=_HINT,
        evidence={"growth": growth, "first_layer": start[0], "first_rms": start[1], "output_rms": peak[1]},
    )
