"""Parameter statistics at the optimizer step: fused norms of gradients, weights and the applied update."""

from __future__ import annotations

import torch

from ..distributed import is_sharded, local
from .collector import ParamBatch


def _dense(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 DTensors: only this rank's shard, never a gather (the collector adds squares across ranks).
    t = local(t)
    # Sparse gradients (nn.Embedding(sparse=True)) hold their values in a dense side tensor.
    return t.coalesce().values() if t.is_sparse else t


def _sq_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norms in fp32, one per tensor: (len,)."""
    if not tensors:
        return torch.zeros(0)
    dense = [_dense(t.detach()) for t in tensors]
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in dense):
        # On the CPU _foreach_norm falls back to one norm per tensor; a dot product is the same single
        # pass with half the work (measured 0.14 vs 0.29 ms for 2.1M parameters).
        return torch.stack([torch.dot(t.reshape(-1), t.reshape(-1)) for t in dense])
    norms = torch._foreach_norm(dense, 2, dtype=torch.float32)  # fused kernels per device/dtype group
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
        sharded=any(is_sharded(p) for _, p in named),
    )


class UpdateProbe:
    """Measures ||w_after - w_before|| of one optimizer step without keeping a copy past the step.

    The copy is made right before ``optimizer.step()`` on collected steps only, turned in place into the
    difference right after it, reduced to norms and released. Parameters that share a device and dtype
    are copied into one flat buffer (one allocation, one copy op): on the CPU a fresh allocation per
    parameter cost more in page faults than the copy itself.
    """

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.names = [n for n, _ in named]
        self.params = [_dense(p.detach()) for _, p in named]  # local shards of FSDP2 parameters
        self.flat: torch.Tensor | None = None
        self.before: list[torch.Tensor] = []
        with torch.no_grad():
            same = {(p.device, p.dtype) for p in self.params}
            if len(same) == 1 and all(p.is_contiguous() for p in self.params):
                self.flat = torch.cat([p.reshape(-1) for p in self.params])
                self.before = list(self.flat.split([p.numel() for p in self.params]))
            else:
                self.before = [p.clone().reshape(-1) for p in self.params]

    def finish(self) -> tuple[list[str], torch.Tensor]:
        if not self.before:  # no parameter had a gradient: the optimizer changed nothing we measure
            return [], torch.zeros(0)
        with torch.no_grad():
            after = [p.reshape(-1) for p in self.params]  # views: the optimizer updated them in place
            torch._foreach_sub_(self.before, after)  # before := before - after
            sq = _sq_norms(self.before)
        self.before, self.flat = [], None
        return self.names, sq
