"""Pure reductions: a tensor in, a few numbers out, on the tensor's own device. No host syncs here.

Each function returns small fp32 tensors; the collector accumulates them per step and packs them for
one transfer. The slot layout of each vector is named by the ``*_SLOTS`` tuples, which the unpacking
side (collector.py) uses, so the two can never disagree about positions.
"""

from __future__ import annotations

import torch

# Additive slots of an activation vector (summed over calls and, later, over DDP ranks).
ACT_SUM_SLOTS = ("sum", "sumsq", "zeros", "neg", "nonfinite", "nan", "saturated")
# Max-type slots (combined with max).
ACT_MAX_SLOTS = ("absmax",)

GRAD_SUM_SLOTS = ("sumsq", "nonfinite", "nan")
GRAD_MAX_SLOTS = ("absmax",)


def activation_stats(
    x: torch.Tensor,
    *,
    band: tuple[float, float] | None,
    count_neg: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of one output tensor: (sums (len(ACT_SUM_SLOTS),), maxes (len(ACT_MAX_SLOTS),)).

    The element count is known on the host and kept there. Written for few passes over memory.
    """
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()  # bf16/fp16 statistics are computed in fp32
    n = flat.numel()
    total = flat.sum()
    sumsq = torch.dot(flat, flat)
    lo, hi = torch.aminmax(flat)
    nonzero = torch.count_nonzero(flat)  # NaN counts as non-zero, as it should
    zeros = n - nonzero
    # x - x is 0 for finite values and NaN for NaN/Inf: one pass counts every non-finite element.
    nonfinite = torch.count_nonzero(flat - flat)
    nan = torch.count_nonzero(flat != flat)  # NaN is the only value unequal to itself
    # sum(sign) = pos - neg and pos + neg = nonzero - nonfinite (nansum skips NaN; ±Inf have a sign, so
    # they are counted once in each and cancel). Relu-like outputs are never negative: a device zero.
    neg = (nonzero - nonfinite - torch.sign(flat).nansum()) / 2 if count_neg else nonzero * 0
    if band is not None:
        low, high = band
        saturated = torch.count_nonzero((flat <= low) | (flat >= high))
    else:
        saturated = nonzero * 0
    sums = torch.stack(
        [
            total,
            sumsq,
            zeros.float(),
            neg.float(),
            nonfinite.float(),
            nan.float(),
            saturated.float(),
        ]
    )
    maxes = torch.maximum(lo.abs(), hi.abs()).reshape(1)
    return sums, maxes


def unit_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-unit largest |value| over every other axis: > 0 means the unit was non-zero for some sample."""
    x = x.detach()
    dims = [d for d in range(x.dim()) if d != dim]
    return x.abs().amax(dim=dims).float()  # (units,)


def grad_stats(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient moments: (sums (len(GRAD_SUM_SLOTS),), maxes (len(GRAD_MAX_SLOTS),))."""
    flat = g.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    sumsq = torch.dot(flat, flat)
    lo, hi = torch.aminmax(flat)
    nonfinite = torch.count_nonzero(flat - flat)
    nan = torch.count_nonzero(flat != flat)
    sums = torch.stack([sumsq, nonfinite.float(), nan.float()])
    maxes = torch.maximum(lo.abs(), hi.abs()).reshape(1)
    return sums, maxes


def strided_sample(x: torch.Tensor, k: int = 1024) -> torch.Tensor:
    """At most k values spread evenly over the tensor: deterministic, consumes no RNG."""
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // k)
    return flat[::step][:k].float().clone()


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) batch mean and biased variance, in fp32: (C,), (C,)."""
    xf = x.detach()
    if xf.dtype != torch.float32:
        xf = xf.float()
    dims = [d for d in range(xf.dim()) if d != 1]
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    return mean, var
