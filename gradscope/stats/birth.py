"""Where NaN/Inf was born in one collected step: the rule, as a pure function of the step's record.

- **Forward**: among modules whose output held NaN/Inf, the first (in the order modules *finish* their
  forward, so an inner module before the one containing it) whose inputs were all finite. A module whose
  input was already non-finite only passed it on; if every such module had non-finite inputs, the data
  itself was non-finite and the first module it reached is named with tensor "input".
- **Backward** (the forward was finite): among modules whose output gradient was finite, the first in
  backward order that passed a non-finite gradient back to its inputs, else one whose own parameter
  gradient is non-finite. Failing that (no input facts, e.g. hooks disabled), the first non-finite output
  gradient in backward order, as before.
- Then the parameters (gradient, weight), then the loss.

Each event names the tensor ("output", "input", "input gradient", "output gradient", "parameter
gradient", "weight", "loss") so a finding can say what was seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .records import StepRecord

if TYPE_CHECKING:
    from .history import History


@dataclass
class NonfiniteEvent:
    """Where and when NaN/Inf was first seen."""

    step: int
    layer: str
    source: str  # "activation", "gradient", "param_grad", "weight", "loss"
    param: str = ""  # the parameter, for "param_grad" / "weight"
    tensor: str = ""  # what held it: "output", "input", "input gradient", "output gradient", ...
    born: bool = False  # True when the module's inputs (or output gradient) were finite: it made the NaN


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def first_nonfinite(history: History, record: StepRecord) -> NonfiniteEvent | None:
    """The birthplace of the step's first NaN/Inf (see the module docstring), or None if all finite."""
    order = history.layer_order()
    step = record.step
    bad_act = [n for n, a in record.activations.items() if a.nonfinite > 0]
    if bad_act:
        by_order = sorted(bad_act, key=lambda n: order.get(n, 1 << 30))
        for name in by_order:
            facts = record.inputs.get(name)
            if facts is not None and facts.nonfinite is False:
                weight = _bad_weight(history, record, name)
                if (
                    weight is not None
                ):  # finite inputs, NaN weights: the weights carry it, from an earlier step
                    return NonfiniteEvent(
                        step=step, layer=name, source="weight", param=weight, tensor="weight"
                    )
                return NonfiniteEvent(step=step, layer=name, source="activation", tensor="output", born=True)
        first = by_order[0]
        facts = record.inputs.get(first)
        if facts is not None and facts.nonfinite:
            return NonfiniteEvent(step=step, layer=first, source="activation", tensor="input")
        return NonfiniteEvent(step=step, layer=first, source="activation", tensor="output")
    ev = _backward(history, record)
    if ev is not None:
        return ev
    for pname, p in record.params.items():
        if p.weight_nonfinite or p.grad_nonfinite:
            info = history.params.get(pname)
            weight = p.weight_nonfinite
            return NonfiniteEvent(
                step=step,
                layer=info.layer if info else "",
                source="weight" if weight else "param_grad",
                param=pname,
                tensor="weight" if weight else "parameter gradient",
            )
    if record.loss is not None and not _finite(record.loss):
        return NonfiniteEvent(step=step, layer="", source="loss", tensor="loss")
    return None


def _bad_weight(history: History, record: StepRecord, layer: str) -> str | None:
    for pname, p in record.params.items():
        info = history.params.get(pname)
        if p.weight_nonfinite and info is not None and info.layer == layer:
            return pname
    return None


def _backward(history: History, record: StepRecord) -> NonfiniteEvent | None:
    step = record.step

    def out_grad_finite(name: str) -> bool:
        g = record.gradients.get(name)
        return g is None or g.nonfinite == 0

    born = [
        (facts.grad_order, name)
        for name, facts in record.inputs.items()
        if facts.grad_nonfinite and out_grad_finite(name)
    ]
    if born:
        name = min(born)[1]
        return NonfiniteEvent(step=step, layer=name, source="gradient", tensor="input gradient", born=True)
    bad_grad = [n for n, g in record.gradients.items() if g.nonfinite > 0]
    # a module's own parameter gradient went non-finite while the gradient reaching its output was finite
    for pname, p in record.params.items():
        info = history.params.get(pname)
        if (
            p.grad_nonfinite
            and not p.weight_nonfinite
            and info is not None
            and out_grad_finite(info.layer)
            and (info.layer in record.gradients or not bad_grad)
        ):
            return NonfiniteEvent(
                step=step,
                layer=info.layer,
                source="param_grad",
                param=pname,
                tensor="parameter gradient",
                born=info.layer in record.gradients,
            )
    if bad_grad:
        layer = min(bad_grad, key=lambda n: record.gradients[n].order)
        return NonfiniteEvent(step=step, layer=layer, source="gradient", tensor="output gradient")
    return None
