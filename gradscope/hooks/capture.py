"""Module hooks: forward outputs, normalization inputs and output gradients, reduced as they pass.

One :class:`ModuleHooks` per scope. Its hooks return at once unless the current step is collected (the
scope flips ``collecting`` at each step boundary); then they hand each tensor to the StepCollector, which
reduces it on its device and keeps nothing of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..stats.collector import StepCollector
from ..stats.records import LayerInfo
from . import selection
from .handles import HandleSet
from .outputs import floating

# Pure containers only route tensors: their outputs repeat their last child's, so they are not measured.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# Evaluation forwards measured per normalization layer between two collected steps (bounds eval cost).
EVAL_BATCHES = 8


def eager(fn: Any) -> Any:
    """Hooks run eagerly even inside torch.compile: dynamo breaks the graph around them instead of
    tracing gradscope's bookkeeping into it, so the statistics are those of the real tensors."""
    disable = getattr(torch.compiler, "disable", None)
    return disable(fn, recursive=True) if disable is not None else fn


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
    elementwise: bool
    order: int = -1
    grad_hook: Any = None  # made once: registered on this module's outputs on every collected step


class ModuleHooks:
    """Owns the per-module hooks of one scope (their handles live in the scope's HandleSet)."""

    def __init__(
        self,
        collector: StepCollector,
        handles: HandleSet,
        layers: dict[str, LayerInfo],
        histograms: bool,
    ) -> None:
        self.collector = collector
        self.handles = handles
        self.layers = layers
        self.histograms = histograms
        self.collecting = True  # step 0 is always collected
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
                elementwise=isinstance(module, selection.ELEMENTWISE),
            )
            w.grad_hook = eager(functools.partial(self.on_grad, name))
            self.handles.keep(module.register_forward_hook(eager(functools.partial(self.on_forward, w))))
            if role == "norm":
                pre = eager(functools.partial(self.on_norm_input, w))
                self.handles.keep(module.register_forward_pre_hook(pre))

    def on_forward(self, w: Watched, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self.collecting or not torch.is_grad_enabled():
            return  # non-collected steps and evaluation forwards cost one attribute read
        if _in_backward():
            return
        if w.order < 0:
            w.order = self._next_order
            self._next_order += 1
            self.layers[w.name].order = w.order
        if self.births is not None:
            self.births.on_forward(w.name, inputs)
        for i, t in enumerate(floating(output)):
            unit = None
            if i == 0:
                inherited = None
                if w.elementwise and self._last_units is not None and self._last_units[0] == t.shape:
                    inherited = self._last_units[1]
                dim = selection.unit_dim(module, t.dim(), inherited)
                if dim is not None:
                    self._last_units = (t.shape, dim)
                unit = dim if w.want_units else None
            if t.is_complex():
                continue
            self.collector.add_activation(
                w.name, t, band=w.band, count_neg=w.count_neg, unit_dim=unit, sample=self.histograms
            )
            if t.requires_grad:
                # A tensor hook, not a module backward hook: it survives in-place ops on the output and
                # sees the gradient with respect to the value this module produced.
                self.handles.keep_for_step(t.register_hook(w.grad_hook))

    def on_grad(self, name: str, grad: torch.Tensor) -> None:
        if self.collecting and grad is not None:
            self.collector.add_grad(name, grad, sample=self.histograms)

    def on_norm_input(self, w: Watched, module: nn.Module, inputs: Any) -> None:
        training = torch.is_grad_enabled()
        if training:
            if not self.collecting or _in_backward():
                return
        else:
            seen = self.collector.eval_norms.get(w.name)
            if seen is not None and seen.calls >= EVAL_BATCHES:
                return
        x = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 0:
            self.collector.add_norm_input(w.name, module, x, training=training)
