"""Reduce one checkpoint tensor to a few numbers (pure tensor → numbers, no findings here).

Speed is memory bandwidth: a tensor is walked in row blocks small enough to stay in the CPU cache, and
everything that needs the block is done while it is there (RMS, abs-max, zero count, and one power-
iteration step of the spectral-norm estimate, W^T W v = Σ_blocks W_b^T (W_b v)). So each power step
costs one read of the tensor from memory, and the statistics ride along with the first one. Blocks of a
16-bit tensor are converted to float32 one at a time: temporaries stay at one block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: Elements per block: 2 MiB of float32, so a block read once from memory is re-read from cache.
BLOCK_ELEMENTS = 1 << 19

#: Power-iteration steps of the spectral-norm estimate (each one read of the tensor): a lower bound,
#: within a few percent for trained weights, whose top singular value stands out; for pure noise
#: matrices, whose top singular values crowd together, it can be ~10 % low.
SPECTRAL_ITERS = 3

#: 1-D tensors up to this size (biases, norm gains, running statistics) are kept whole for the rules.
KEEP_VALUES = 1 << 20


@dataclass
class TensorStats:
    """The numbers behind one row of the per-layer table and the weight-only rules."""

    name: str  # display name, e.g. "encoder.0.fc1.weight"
    layer: str  # owning module, e.g. "encoder.0.fc1"
    leaf: str  # attribute on that module, e.g. "weight", "running_var"
    shape: tuple[int, ...]
    dtype: str
    numel: int
    rms: float
    absmax: float
    zero_frac: float  # share of elements exactly zero
    nan: int
    inf: int
    spectral: float | None = None  # largest singular value estimate, 2-D floating tensors only
    values: np.ndarray | None = None  # float64 copy of small 1-D tensors
    row_norms: np.ndarray | None = None  # ≥2-D: L2 norm of each slice along dim 0 (a unit's weights)
    zero_rows: np.ndarray | None = None  # ≥2-D: True where that slice is all exact zeros

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0

    @property
    def fan_in(self) -> int:
        """Inputs per unit, as torch.nn.init computes it for Linear and Conv weights."""
        return self.numel // self.shape[0] if len(self.shape) >= 2 and self.shape[0] else 0

    def row(self) -> dict[str, float | int | str | list[int] | None]:
        """This tensor's row of the per-layer table (JSON-safe)."""
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
            "rms": _json_float(self.rms),
            "abs_max": _json_float(self.absmax),
            "spectral_norm": None if self.spectral is None else _json_float(self.spectral),
            "zero_fraction": _json_float(self.zero_frac),
            "nonfinite": self.nan + self.inf,
        }


def split_name(name: str) -> tuple[str, str]:
    """("encoder.0.fc1", "weight") from "encoder.0.fc1.weight": the module is the key minus its leaf."""
    layer, _, leaf = name.rpartition(".")
    return layer, leaf


def tensor_stats(name: str, tensor: torch.Tensor, spectral_iters: int = SPECTRAL_ITERS) -> TensorStats:
    """Reduce ``tensor`` to a TensorStats: RMS, abs-max, zero share, NaN/Inf counts, per-row facts."""
    layer, leaf = split_name(name)
    x = tensor.detach()
    shape = tuple(int(d) for d in x.shape)
    dtype = str(x.dtype).removeprefix("torch.")
    numel = x.numel()
    if numel == 0:
        return TensorStats(name, layer, leaf, shape, dtype, 0, 0.0, 0.0, 0.0, 0, 0)
    if x.is_quantized:
        x = x.dequantize()
    elif x.layout != torch.strided:  # sparse weights: zeros are stored implicitly, count them as zeros
        x = x.to_dense()
    if x.is_complex():
        x = x.abs()
    rows = x.reshape(shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)  # (units, fan_in)
    spectral = x.dim() == 2 and x.is_floating_point() and min(shape) >= 2 and spectral_iters > 0
    power = _PowerStep(rows.shape[1], torch.float64 if x.dtype == torch.float64 else torch.float32) \
        if spectral else None

    absmax, nonzero = 0.0, 0
    row_norms: list[torch.Tensor] = []
    for b in _blocks(rows):  # (rows_in_block, fan_in), in the working float dtype
        norms = torch.linalg.vector_norm(b, dim=1)
        lo, hi = torch.aminmax(b)
        scale = max(-float(lo), float(hi))
        if not math.isfinite(float(norms.sum())) and math.isfinite(scale) and scale > 0:
            norms = torch.linalg.vector_norm(b / scale, dim=1) * scale  # squares overflowed, values did not
        row_norms.append(norms.double())
        absmax = scale if math.isnan(scale) or scale > absmax else absmax
        nonzero += int(torch.count_nonzero(b))
        if power is not None:
            power.add(b)
    all_norms = torch.cat(row_norms)  # (units,)
    sumsq = float(all_norms.square().sum())
    nan = inf = 0
    if not (math.isfinite(sumsq) and math.isfinite(absmax)):
        for block in _blocks(rows):
            nan += int(torch.isnan(block).sum())
            inf += int(torch.isinf(block).sum())

    stats = TensorStats(
        name, layer, leaf, shape, dtype, numel,
        rms=math.sqrt(sumsq / numel) if math.isfinite(sumsq) else float("nan"),
        absmax=absmax,
        zero_frac=(numel - nonzero) / numel,
        nan=nan,
        inf=inf,
    )
    if x.dim() <= 1 and numel <= KEEP_VALUES:
        stats.values = x.reshape(-1).to(torch.float64).numpy().copy()
    if x.dim() >= 2:
        stats.row_norms = all_norms.numpy().copy()
        stats.zero_rows = _zero_rows(rows, stats.row_norms)
    if power is not None and stats.finite:
        stats.spectral = power.finish(rows, spectral_iters)
    return stats


def _blocks(rows: torch.Tensor):  # type: ignore[no-untyped-def]
    """Row blocks of about BLOCK_ELEMENTS elements, as float32 (float64 stays float64)."""
    work = torch.float64 if rows.dtype == torch.float64 else torch.float32
    per_block = max(1, BLOCK_ELEMENTS // max(1, rows.shape[1]))
    for block in rows.split(per_block):
        yield block if block.dtype == work else block.to(work)


class _PowerStep:
    """Power iteration on W^T W, accumulated block by block: v ← Σ_b W_b^T (W_b v) / ‖·‖."""

    def __init__(self, cols: int, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)  # a deterministic estimate; the global RNG is untouched
        v = torch.randn(cols, generator=gen, dtype=torch.float64)
        self.v = (v / torch.linalg.vector_norm(v)).to(dtype)  # (cols,), unit norm
        self.acc = torch.zeros(cols, dtype=dtype)  # (cols,) = W^T W v so far

    def add(self, block: torch.Tensor) -> None:
        self.acc += (block @ self.v) @ block  # W_b^T (W_b v): (rows_b,) then (cols,)

    def next(self) -> float:
        """Finish one step; returns sqrt(‖W^T W v‖) for the unit v it started from (≤ σ_max)."""
        norm = float(torch.linalg.vector_norm(self.acc))
        if norm > 0 and math.isfinite(norm):
            self.v = self.acc / norm
        self.acc = torch.zeros_like(self.acc)
        return math.sqrt(norm) if math.isfinite(norm) else float("nan")

    def finish(self, rows: torch.Tensor, iters: int) -> float:
        """The first step was accumulated with the statistics; run the remaining ones."""
        sigma = self.next()
        for _ in range(iters - 1):
            if sigma == 0.0 or not math.isfinite(sigma):
                break
            for b in _blocks(rows):
                self.add(b)
            sigma = self.next()
        return sigma


def _zero_rows(rows: torch.Tensor, norms: np.ndarray) -> np.ndarray:
    """Rows of exact zeros. A zero norm only nominates a row (tiny values can underflow when squared)."""
    mask = norms == 0
    for i in np.flatnonzero(mask):
        mask[i] = not bool(torch.count_nonzero(rows[int(i)]))
    return mask


def spectral_norm(matrix: torch.Tensor, iters: int = SPECTRAL_ITERS) -> float:
    """Estimate the largest singular value of a 2-D tensor (a lower bound) by power iteration on W^T W."""
    rows = matrix.detach().reshape(matrix.shape[0], -1)
    power = _PowerStep(rows.shape[1], torch.float64 if rows.dtype == torch.float64 else torch.float32)
    for b in _blocks(rows):
        power.add(b)
    return power.finish(rows, iters)


def _json_float(value: float) -> float | str:
    """JSON has no NaN/Inf: keep them readable as strings, as gradscope.findings does for evidence."""
    if math.isfinite(value):
        return float(value)
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
