"""Parameter statistics at the optimizer step: fused norms of gradients, weights and the applied update."""

from __future__ import annotations

import torch

from .collector import ParamBatch


def _dense(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 DTensors: only this rank's shard, never a gather (the collector adds squares across ranks).
    if hasattr(t, "to_local") and hasattr(t, "placements"):
        t = t.to_local()
    # Sparse gradients (nn.Embedding(sparse=True)) hold their values in a dense side tensor.
    return t.coalesce().values() if t.is_sparse else t


def _sq_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norms, accumulated in fp32 by one fused kernel per device/dtype group: (len,)."""
    if not tensors:
        return torch.zeros(0)
    norms = torch._foreach_norm([_dense(t.detach()) for t in tensors], 2, dtype=torch.float32)
    return torch.stack([n.to(norms[0].device) for n in norms]).square()


def param_batch(named: list[tuple[str, torch.nn.Parameter]]) -> ParamBatch:
    """Gradient and weight norms of every trainable parameter, read before the optimizer touches them."""
    names = [n for n, _ in named]
    has_grad = [p.grad is not None for _, p in named]
    grads = [p.grad for _, p in named if p.grad is not None]
    return ParamBatch(
        names=names,
        grad_names=[n for (n, _), h in zip(named, has_grad, strict=True) if h],
        grad_sq=_sq_norms(grads),  # type: ignore[arg-type]
        has_grad=has_grad,
        weight_sq=_sq_norms([p for _, p in named]),
        sharded=any(hasattr(p, "placements") for _, p in named),
    )


class UpdateProbe:
    """Measures ||w_after - w_before|| of one optimizer step without keeping a copy past the step.

    The copy is made right before ``optimizer.step()`` on collected steps only, turned in place into the
    difference right after it, reduced to norms and released.
    """

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.names = [n for n, _ in named]
        self.params = [_dense(p.detach()) for _, p in named]  # local shards of FSDP2 parameters
        with torch.no_grad():
            self.before = [p.clone() for p in self.params]

    def finish(self) -> tuple[list[str], torch.Tensor]:
        if not self.before:  # no parameter had a gradient: the optimizer changed nothing we measure
            return [], torch.zeros(0)
        with torch.no_grad():
            torch._foreach_sub_(self.before, self.params)  # before := before - after (params updated in place)
            sq = _sq_norms(self.before)
        self.before = []
        return self.names, sq
