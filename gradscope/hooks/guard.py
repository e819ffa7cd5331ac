"""The one guard every gradscope hook runs inside: an error never reaches the training loop.

A statistic that raises is switched off for that layer only (the rest of the run is still measured), one
GradscopeWarning per layer names the module, the error and what is no longer measured, and the reason is
kept in ``History.unmeasured`` so that the report can say which layers were not measured and why.
The guard never touches a training tensor: it only decides whether gradscope's own code runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from ..errors import GradscopeWarning

# What each statistic measures, in the words of the warning and the report ("... no longer measured").
STATISTICS: dict[str, str] = {
    "activations": "the output statistics (dead units, saturation, NaN/Inf in outputs)",
    "gradients": "the output-gradient statistics (vanishing/exploding gradients, NaN/Inf in gradients)",
    "norm inputs": "the normalization-input statistics (drift from running statistics)",
    "parameters": "the parameter gradient and weight norms",
    "updates": "the optimizer update sizes",
    "scaler": "the GradScaler's skipped steps",
    "steps": "the statistics of whole steps",
}

# The collector's kinds of statistic, by the guard's names for them.
KIND_TO_STAT = {
    "act": "activations",
    "grad": "gradients",
    "norm": "norm inputs",
    "eval_norm": "norm inputs",
    "param": "parameters",
    "pstat": "parameters",
}

#: The name under which statistics of the model as a whole (parameters, optimizer, scaler) are kept.
MODEL = ""


class Guard:
    """Runs hook bodies; remembers which (layer, statistic) pairs failed and keeps them off."""

    def __init__(self, unmeasured: dict[str, str], layer_types: dict[str, str]) -> None:
        self.unmeasured = unmeasured  # History.unmeasured: layer -> why it is (partly) not measured
        self.layer_types = layer_types
        self.off: set[tuple[str, str]] = set()
        self.step = 0  # the training step in progress, for the reason's text
        self._warned: set[str] = set()

    def disabled(self, layer: str, stat: str) -> bool:
        return (layer, stat) in self.off

    def call(self, layer: str, stat: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` unless this statistic is off for this layer; an error switches it off."""
        if (layer, stat) in self.off:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            self.fail(layer, stat, exc)
            return None

    def fail(self, layer: str, stat: str, exc: BaseException) -> None:
        """Switch ``stat`` off for ``layer``, record why, and warn once per layer."""
        if (layer, stat) in self.off:
            return
        self.off.add((layer, stat))
        what = STATISTICS.get(stat, stat)
        error = f"{type(exc).__name__}: {exc}".strip()
        if len(error) > 300:
            error = error[:297] + "..."
        reason = f"{stat} not measured from step {self.step} ({error})"
        previous = self.unmeasured.get(layer)
        self.unmeasured[layer] = reason if previous is None else f"{previous}; {reason}"
        if layer in self._warned:
            return
        self._warned.add(layer)
        warnings.warn(
            f"gradscope stopped measuring {what} of {self.describe(layer)} after an error in its hook "
            f"({error}); training is not affected and the report lists it as not measured",
            GradscopeWarning,
            stacklevel=3,
        )

    def describe(self, layer: str) -> str:
        if layer == MODEL:
            return "the model"
        kind = self.layer_types.get(layer)
        return f"layer '{layer}' ({kind})" if kind else f"'{layer}'"
