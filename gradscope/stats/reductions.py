"""Pure reductions: a tensor in, a few numbers out, on the tensor's own device. No host syncs here.

Each function returns small fp32 tensors; the collector accumulates them per step and packs them for
one transfer. The slot layout of each vector is named by the ``*_SLOTS`` tuples, which the unpacking
side (collector.py) uses, so the two can never disagree about positions.

On small tensors the cost of a reduction is the dispatch of each op, not the pass over memory, so these
functions are written for the fewest ops: every statistic that can be derived on the host is (element
counts, the zero count from the non-zero count, absmax from min and max).
"""

from __future__ import annotations

import torch

# Additive slots of an activation vector (summed over calls and, later, over DDP ranks). "neg" is present
# only when counted, "saturated" only for modules with a saturation band: see act_sum_slots().
ACT_SUM_SLOTS = ("sum", "sumsq", "nonzero", "nonfinite", "neg", "saturated")
# Max-type slots (combined with max): the largest value and the negated smallest one.
ACT_MAX_SLOTS = ("max", "neg_min")

GRAD_SUM_SLOTS = ("sumsq", "nonfinite")
GRAD_MAX_SLOTS = ("max", "neg_min")


def act_sum_slots(*, count_neg: bool, band: bool) -> tuple[str, ...]:
    """The sum slots an activation vector carries for a module of this kind, in order."""
    return ACT_SUM_SLOTS[:4] + (("neg",) if count_neg else ()) + (("saturated",) if band else ())


def _nonfinite_count(flat: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """How many elements are NaN/Inf. A finite sum of squares proves there are none; on the CPU reading
    it costs nothing (there is no device to wait for), so the counting pass runs only when needed. On an
    accelerator, branching on it would be a host-device sync, so the count is always taken there."""
    if flat.device.type == "cpu" and bool(torch.isfinite(sumsq)):
        return sumsq.new_zeros(())
    # x - x is 0 for finite values and NaN for NaN/Inf: one pass counts every non-finite element.
    return torch.count_nonzero(flat - flat).to(sumsq.dtype)


def _flat32(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1)
    return flat if flat.dtype == torch.float32 else flat.float()  # bf16/fp16 statistics in fp32


def activation_stats(
    x: torch.Tensor,
    *,
    band: tuple[float, float] | None,
    count_neg: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of one output tensor: (sums (act_sum_slots(...),), maxes (ACT_MAX_SLOTS,))."""
    flat = _flat32(x)
    lo, hi = torch.aminmax(flat)
    sumsq = torch.dot(flat, flat)
    if flat.device.type == "cpu" and bool(torch.isfinite(sumsq)):
        # The common case on the CPU: nothing non-finite, counts from branch-free sign sums.
        slots = [flat.sum(), sumsq, *_counts_by_sign(flat, count_neg)]
        slots.insert(3, sumsq.new_zeros(()))  # nonfinite
    else:
        slots = [flat.sum(), sumsq, torch.count_nonzero(flat).float(), _nonfinite_count(flat, sumsq)]
        if count_neg:  # relu-like outputs are never negative: not counted
            slots.append(torch.count_nonzero(flat < 0).float())
    if band is not None:
        slots.append(_count_outside(flat, band))
    # slot order: sum, sumsq, nonzero, nonfinite, [neg], [saturated]
    return torch.stack(slots), torch.stack([hi, -lo])


def _counts_by_sign(flat: torch.Tensor, count_neg: bool) -> list[torch.Tensor]:
    """[non-zero count, (negative count)] from sums of sign(x), for finite tensors on the CPU.

    count_nonzero branches per element, and on half-zero ReLU outputs the CPU mispredicts half of those
    branches (2.4 ms per million elements, measured); summing sign(x) is vectorized (0.09 ms)."""
    sign = torch.sign(flat)
    if not count_neg:  # relu-like: sign is 0 or 1, its sum is the non-zero count
        return [sign.sum()]
    balance = sign.sum()  # positives - negatives
    nonzero = sign.abs_().sum()  # positives + negatives
    return [nonzero, (nonzero - balance) / 2]


def _count_outside(flat: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    """Elements at or beyond either edge of the band, counted branch-free: |x - mid| >= half-width."""
    low, high = band
    mid, half = (low + high) / 2, (high - low) / 2
    return (flat - mid).abs_().ge_(half).sum()


def unit_absmax(x: torch.Tensor, dim: int, nonnegative: bool = False) -> torch.Tensor:
    """Per-unit largest |value| over every other axis: > 0 means the unit was non-zero for some sample."""
    x = x.detach()
    dims = [d for d in range(x.dim()) if d != dim]
    if not nonnegative:
        x = x.abs()
    out = x.amax(dim=dims)  # (units,)
    return out if out.dtype == torch.float32 else out.float()


def grad_stats(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient moments: (sums (len(GRAD_SUM_SLOTS),), maxes (len(GRAD_MAX_SLOTS),))."""
    flat = _flat32(g)
    lo, hi = torch.aminmax(flat)
    sumsq = torch.dot(flat, flat)
    return torch.stack([sumsq, _nonfinite_count(flat, sumsq)]), torch.stack([hi, -lo])


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
