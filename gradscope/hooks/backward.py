"""Where a NaN is born: the finiteness of each module's inputs (forward) and of the gradient it passes
back to them (backward), on collected steps.

The first non-finite tensor is not where a NaN was born. Forward hooks fire when a module *finishes*, so
the Linear after a fully masked softmax reports its NaN output before the attention module that holds
the softmax does; and a module whose backward alone produces NaN (its output gradient finite, the
gradient it passes to its inputs not) shows its first NaN in the gradient of the module *before* it.
Knowing, per module, whether what came in was finite separates the module that made the NaN from those
that only passed it on (gradscope/stats/birth.py applies the rule).

Elementwise activations, dropout and identities (``selection.ELEMENTWISE``) are skipped: from finite inputs
they give finite outputs and, from a finite output gradient, a finite input gradient, so they can pass a NaN
on but never make one, and they are a third of the modules of a typical network.

Cost, on collected steps only: one fp32 sum per floating input of each module (a sum is NaN/Inf exactly
when an element is, short of fp32 overflow of huge finite values) and one per input gradient, kept on the
device and moved with one transfer at the end of the step. Uncollected steps pay nothing: the capture
hook that calls :meth:`BirthHooks.on_forward` returns before it on those.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch

from ..distributed import local
from ..errors import GradscopeWarning
from ..stats.records import InputStats
from ..stats.sentinel import Landing
from .handles import HandleSet
from .outputs import floating


def _sum32(t: torch.Tensor) -> torch.Tensor | None:
    t = local(t.detach())
    if t.is_sparse or t.is_complex() or t.numel() == 0 or t.layout != torch.strided:
        return None
    return t.sum(dtype=torch.float32)


class BirthHooks:
    """Per-step input and input-gradient finiteness of every module that ran, on the device."""

    def __init__(self, handles: HandleSet, skip: frozenset[str] = frozenset()) -> None:
        self.handles = handles
        self.skip = skip  # modules that cannot make a NaN (elementwise): not measured
        self.enabled = True
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._grads: dict[str, list[torch.Tensor]] = {}
        self._grad_order: dict[str, int] = {}
        self._hooks: dict[str, Any] = {}
        self._pending: tuple[list[tuple[str, str]], Landing | None] | None = None

    def on_forward(self, name: str, inputs: Any) -> None:
        """A module ran (on a collected, grad-enabled step): note its inputs, hook their gradients."""
        if not self.enabled or name in self.skip:
            return
        try:
            sums = self._inputs.setdefault(name, [])
            for t in floating(inputs):
                s = _sum32(t)
                if s is None:
                    continue
                sums.append(s)
                if t.requires_grad:
                    hook = self._hooks.get(name)
                    if hook is None:
                        hook = self._hooks[name] = functools.partial(self._on_input_grad, name)
                    self.handles.keep_for_step(t.register_hook(hook))
        except Exception as exc:
            self._fail(exc)

    def _on_input_grad(self, name: str, grad: torch.Tensor) -> None:
        if not self.enabled or grad is None:
            return
        try:
            s = _sum32(grad)
            if s is None:
                return
            self._grads.setdefault(name, []).append(s)
            self._grad_order.setdefault(name, len(self._grad_order))
        except Exception as exc:
            self._fail(exc)

    def begin(self) -> None:
        """Start this step's copy to the host, before the step's own transfer (which then lands it too)."""
        try:
            keys: list[tuple[str, str]] = []
            flat: list[torch.Tensor] = []
            for kind, table in (("in", self._inputs), ("grad", self._grads)):
                for name, sums in table.items():
                    if sums:
                        keys.append((kind, name))
                        # a sum of sums: NaN/Inf iff one of them is (fp32 overflow aside)
                        flat.append(torch.stack([s.to(sums[0].device) for s in sums]).sum())
            landing = Landing(torch.stack([f.to(flat[0].device) for f in flat])) if flat else None
            self._pending = (keys, landing)
        except Exception as exc:
            self._fail(exc)

    def reset(self) -> None:
        self._pending = None
        self._inputs.clear()
        self._grads.clear()
        self._grad_order.clear()

    def take(self) -> dict[str, InputStats]:
        """This step's facts as host values (one transfer), and forget them."""
        try:
            return self._take()
        except Exception as exc:
            self._fail(exc)
            return {}
        finally:
            self.reset()

    def _take(self) -> dict[str, InputStats]:
        if self._pending is None:
            self.begin()
        if self._pending is None:
            return {}
        keys, landing = self._pending
        out: dict[str, InputStats] = {}
        if landing is not None:
            host = landing.values()
            for (kind, name), v in zip(keys, host, strict=True):
                st = out.setdefault(name, InputStats())
                if kind == "in":
                    st.nonfinite = not math.isfinite(v)
                else:
                    st.grad_nonfinite = not math.isfinite(v)
                    st.grad_order = self._grad_order.get(name, -1)
        for name in self._inputs:  # ran with no floating input (token ids): nothing non-finite came in
            st = out.setdefault(name, InputStats())
            if st.nonfinite is None:
                st.nonfinite = False
        return out

    def _fail(self, exc: BaseException) -> None:
        self.enabled = False
        self.reset()
        warnings.warn(
            f"gradscope stopped checking module inputs for NaN/Inf ({exc!r}); where a NaN was born is "
            "located from module outputs only from now on",
            GradscopeWarning,
            stacklevel=2,
        )
