"""Module hooks: forward outputs, normalization inputs and output gradients, reduced as they pass.

One :class:`ModuleHooks` per scope. Its hooks return at once unless the current step is collected (the
scope flips ``collecting`` at each step boundary); then they hand each tensor to the StepCollector, which
reduces it on its device and keeps nothing of it. Every hook body runs inside the scope's Guard: an error
switches that statistic off for that module and never reaches the user's forward or backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..stats.collector import StepCollector
from ..stats.records import LayerInfo
from . import selection
from .guard import Guard
from .handles import HandleSet
from .outputs import iter_tensors

# Pure containers only route tensors: their outputs repeat their last child's, so they are not measured.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# Evaluation forwards measured per normalization layer between two collected steps (bounds eval cost).
EVAL_BATCHES = 8

ACT, GRAD, NORM = "activations", "gradients", "norm inputs"
_KIND = {ACT: "act", GRAD: "grad", NORM: "norm"}


def eager(fn: Any) -> Any:
    """Hooks run eagerly even inside torch.compile: dynamo breaks the graph around them instead of
    tracing gradscope's bookkeeping into it, so the statistics are those of the real tensors."""
    disable = getattr(torch.compiler, "disable", None)
    return disable(fn, recursive=True) if disable is not None else fn


def gated(hooks: ModuleHooks, inner: Any) -> Any:
    """A forward hook that returns at once on uncollected steps and only then enters ``inner`` (the
    eager, compile-disabled hook). Entering a ``torch.compiler.disable`` wrapper costs ~10 us per call:
    paid for every module on every step, that alone was ~1 % of a small model's step. Under torch.compile
    the check is traced (guarded on ``collecting``), so uncollected steps keep their graph unbroken."""

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if not hooks.collecting:
            return None
        return inner(module, inputs, output)

    return hook


def _in_backward() -> bool:
    # Activation checkpointing re-runs forwards inside backward: those outputs were already measured.
    return torch._C._current_graph_task_id() != -1


@dataclass
class Watched:
    """What the hooks need to know about one module, resolved once at watch() time."""

    name: str
    role: str
    band: tuple[float, float] | None
    count_neg: bool  # relu-like outputs are never negative: skip counting
    want_units: bool  # per-unit alive masks: where outputs can be exactly zero
    weighted: bool  # Linear/Conv: per-unit max of outputs and of their gradients
    elementwise: bool
    order: int = -1
    grad_hooks: dict[int | None, Any] = field(default_factory=dict)  # by unit axis, made once each


class ModuleHooks:
    """Owns the per-module hooks of one scope (their handles live in the scope's HandleSet)."""

    def __init__(
        self,
        collector: StepCollector,
        handles: HandleSet,
        layers: dict[str, LayerInfo],
        histograms: bool,
        guard: Guard,
    ) -> None:
        self.collector = collector
        self.handles = handles
        self.layers = layers
        self.histograms = histograms
        self.guard = guard
        self.collecting = True  # step 0 is always collected
        self.forwards_seen = False  # a hooked training forward ran in this collected step (outputs or not)
        self.births: Any = None  # hooks/backward.py: finiteness of each module's inputs (set by the scope)
        self._next_order = 0
        self._last_units: tuple[torch.Size, int] | None = None

    def install(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, CONTAINERS):
                continue
            role = selection.role_of(module)
            w = Watched(
                name=name,
                role=role,
                band=selection.band_for(module) if role == "saturating" else None,
                count_neg=role != "relu",
                want_units=role == "relu",
                weighted=role == "linear",
                elementwise=isinstance(module, selection.ELEMENTWISE),
            )
            forward = gated(self, eager(functools.partial(self.on_forward, w)))
            self.handles.keep(module.register_forward_hook(forward))
            if role == "norm":
                pre = eager(functools.partial(self.on_norm_input, w))
                self.handles.keep(module.register_forward_pre_hook(pre))

    def _run(self, w: Watched, stat: str, fn: Any, *args: Any) -> None:
        """``fn`` under the guard; on an error, what it gathered for this module this step is dropped."""
        if self.guard.disabled(w.name, stat):
            return
        try:
            fn(*args)
        except Exception as exc:
            self.collector.drop(_KIND[stat], w.name)
            if stat == NORM:
                self.collector.drop("eval_norm", w.name)
            self.guard.fail(w.name, stat, exc)

    # --- forward ----------------------------------------------------------------------------------
    def on_forward(self, w: Watched, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self.collecting or not torch.is_grad_enabled():
            return  # non-collected steps and evaluation forwards cost one attribute read
        if _in_backward():
            return
        self.forwards_seen = True
        if self.guard.disabled(w.name, ACT) and self.guard.disabled(w.name, GRAD):
            return
        outs: list[tuple[torch.Tensor, torch.Tensor, int | None]] = []
        try:
            self._outputs(w, module, output, outs)
        except Exception as exc:  # nothing of this module can be measured
            self.guard.fail(w.name, ACT, exc)
            self.guard.fail(w.name, GRAD, exc)
            return
        if self.births is not None:
            self.births.on_forward(w.name, inputs)  # guarded inside: it switches itself off on an error
        self._run(w, ACT, self._activations, w, outs)
        self._run(w, GRAD, self._grad_hooks, w, outs)

    def _outputs(self, w: Watched, module: nn.Module, output: Any, outs: list) -> None:
        """(the output tensor, the tensor to reduce, its unit axis) for each measurable output."""
        if w.order < 0:
            w.order = self._next_order
            self._next_order += 1
            self.layers[w.name].order = w.order
        first = True
        for t in iter_tensors(output):
            x = selection.measurable(t)
            if x is None:
                continue
            dim = None
            if first:
                inherited = None
                if w.elementwise and self._last_units is not None and self._last_units[0] == x.shape:
                    inherited = self._last_units[1]
                dim = selection.unit_dim(module, x.dim(), inherited)
                if dim is not None:
                    self._last_units = (x.shape, dim)
                first = False
            outs.append((t, x, dim))

    def _activations(self, w: Watched, outs: list) -> None:
        for _, x, dim in outs:
            self.collector.add_activation(
                w.name,
                x,
                band=w.band,
                count_neg=w.count_neg,
                unit_dim=dim if w.want_units else None,
                unit_max_dim=dim if w.weighted else None,
                sample=self.histograms,
                order=w.order,
            )

    def _grad_hooks(self, w: Watched, outs: list) -> None:
        for t, _, dim in outs:
            if t.requires_grad:
                # A tensor hook, not a module backward hook: it survives in-place ops on the output and
                # sees the gradient with respect to the value this module produced.
                unit = dim if w.weighted else None
                hook = w.grad_hooks.get(unit)
                if hook is None:
                    hook = w.grad_hooks[unit] = eager(functools.partial(self.on_grad, w, unit))
                self.handles.keep_for_step(t.register_hook(hook))

    # --- backward ---------------------------------------------------------------------------------
    def on_grad(self, w: Watched, unit: int | None, grad: torch.Tensor) -> None:
        if self.collecting and grad is not None:
            self._run(w, GRAD, self._gradient, w, unit, grad)

    def _gradient(self, w: Watched, unit: int | None, grad: torch.Tensor) -> None:
        g = selection.measurable(grad)
        if g is not None:
            self.collector.add_grad(w.name, g, sample=self.histograms, unit_dim=unit if g.dim() > 1 else None)

    # --- normalization inputs ---------------------------------------------------------------------
    def on_norm_input(self, w: Watched, module: nn.Module, inputs: Any) -> None:
        # BatchNorm normalizes with batch statistics exactly when the module is in training mode,
        # whatever the grad mode: an eval() forward with grad enabled is an evaluation.
        training = bool(module.training)
        if training:
            if not self.collecting or _in_backward():
                return
        else:
            seen = self.collector.eval_norms.get(w.name)
            if seen is not None and seen.calls >= EVAL_BATCHES:
                return
        self._run(w, NORM, self._norm_input, w, module, inputs, training)

    def _norm_input(self, w: Watched, module: nn.Module, inputs: Any, training: bool) -> None:
        x = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        x = selection.measurable(x)
        if x is not None:
            self.collector.add_norm_input(w.name, module, x, training=training)
