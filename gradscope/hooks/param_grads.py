"""Parameter gradients as backward produced them: post-accumulate-grad hooks armed on collected steps.

Between ``loss.backward()`` and ``optimizer.step()`` users clip (``clip_grad_norm_``) and scalers unscale,
so a gradient read at the optimizer step is the clipped one: an exploding RNN clipped to norm 1 looks
healthy there. A post-accumulate-grad hook fires each time backward has accumulated into ``p.grad``; the
last firing of a step holds the gradient summed over all its micro-batches, before anything else touched
it. Its squared norm is reduced on the device right there (the next firing overwrites it), and the scope
divides by the loss scale when a GradScaler scaled the loss.

The hooks exist only on collected steps (armed at the step's start, removed at its end with the step's
other tensor hooks), so uncollected steps pay nothing. In a distributed run they are not armed: DDP
averages gradients after these hooks fire, so they would hold this rank's local gradient only.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from ..distributed import local
from ..errors import GradscopeWarning
from ..stats.sentinel import Landing
from .handles import HandleSet


@dataclass
class PreClip:
    """Squared norms of the gradients backward produced, per parameter, and the loss scale they carry."""

    names: list[str]
    sq: torch.Tensor  # (len(names),) fp32 on the device
    landing: Landing | None = None  # sq, then the loss scale if any, on their way to the host
    scaled: bool = False


class ParamGradHooks:
    """Owns the per-step post-accumulate-grad hooks of one scope."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.named = [
            (n, p) for n, p in named if p.is_leaf and hasattr(p, "register_post_accumulate_grad_hook")
        ]
        self.enabled = True
        self.frozen = False
        self._sq: dict[str, torch.Tensor] = {}

    def arm(self, handles: HandleSet) -> None:
        """Register the hooks for the step that starts now (they are removed with the step's handles)."""
        self.frozen = False
        if not self.enabled:
            return
        try:
            for name, p in self.named:
                if not p.requires_grad:  # frozen for now (requires_grad_(False) mid-run): no gradient comes
                    continue
                if isinstance(p, torch.nn.parameter.UninitializedTensorMixin):  # a lazy module before its forward
                    continue
                handles.keep_for_step(
                    p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, name))
                )
        except Exception as exc:  # never into training: measure post-clip gradients only from now on
            self._fail(exc)

    def freeze(self) -> None:
        """The optimizer is about to use the gradients: what backward produced so far is the step's.
        (step(closure) re-runs backward inside step(): its first call's gradients are the step's.)"""
        self.frozen = True

    def _on_grad(self, name: str, p: torch.Tensor) -> None:
        if not self.enabled or self.frozen:
            return
        try:
            g = p.grad
            if g is None:
                return
            g = local(g.detach())
            if g.is_sparse:
                g = g.coalesce().values()
            # dtype=float32 accumulates bf16/fp16 gradients in fp32 without an fp32 copy of them
            self._sq[name] = torch.linalg.vector_norm(g, dtype=torch.float32).square()
        except Exception as exc:
            self._fail(exc)

    def take(self, scale: torch.Tensor | None = None) -> PreClip | None:
        """What this step's hooks measured (None if nothing), its copy to the host started, and forget it.
        ``scale``: the GradScaler's scale that backward used (the gradients carry it)."""
        sq, self._sq = self._sq, {}
        if not sq:
            return None
        names = list(sq)
        device = sq[names[0]].device
        vec = torch.stack([sq[n].to(device) for n in names])
        pre = PreClip(names=names, sq=vec, scaled=scale is not None)
        if scale is not None:
            vec = torch.cat([vec, scale.detach().reshape(1).float().to(device)])
        pre.landing = Landing(vec)
        return pre

    def _fail(self, exc: BaseException) -> None:
        self.enabled = False
        self._sq = {}
        warnings.warn(
            f"gradscope stopped reading gradients before clipping ({exc!r}); gradient norms are read at the "
            "optimizer step from now on",
            GradscopeWarning,
            stacklevel=2,
        )


def apply_pre_clip(record: object, pre: PreClip) -> None:
    """Make each ParamStats.grad_norm the norm backward produced (unscaled), keep the one the optimizer
    received as ``grad_norm_clipped``, and set the step's ``clip_ratio`` (pre-clip / post-clip global norm).

    Its values were copied along with the step's own transfer (no extra sync on a GPU)."""
    host = pre.landing.values() if pre.landing is not None else pre.sq.cpu().tolist()
    s = host[-1] if pre.scaled else 1.0
    s = s if s > 0 and math.isfinite(s) else 1.0
    params = record.params  # type: ignore[attr-defined]
    pre_total = post_total = 0.0
    for name, sq in zip(pre.names, host, strict=False):
        ps = params.get(name)
        if ps is None:
            continue
        norm = math.sqrt(sq) / s if sq >= 0 else sq  # NaN/Inf pass through
        post = ps.grad_norm
        ps.grad_norm_clipped = post
        ps.grad_norm = norm
        ps.grad_nonfinite = ps.grad_nonfinite or not math.isfinite(norm)
        if post is not None:
            pre_total += norm * norm
            post_total += post * post
    if post_total > 0 and math.isfinite(pre_total) and math.isfinite(post_total):
        record.clip_ratio = math.sqrt(pre_total / post_total)  # type: ignore[attr-defined]
