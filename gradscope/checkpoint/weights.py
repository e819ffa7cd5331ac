"""Reduce one checkpoint tensor to a few numbers (pure tensor → numbers, no findings here).

Each tensor is read once in row blocks, so a tensor that is not float32 is converted one block at a
time and temporaries stay small; only the spectral-norm estimate needs the whole matrix in float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: Elements per block of a blockwise reduction (64 MiB of float32).
BLOCK_ELEMENTS = 1 << 24

#: Power-iteration steps of the spectral-norm estimate: a lower bound that is within a few percent
#: for trained weights, whose top singular value stands out; looser for pure noise matrices.
SPECTRAL_ITERS = 4

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
    if x.is_complex():
        x = x.abs()
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.reshape(shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)  # (units, fan_in)

    sumsq = 0.0
    absmax = 0.0
    nonzero = 0
    row_norms: list[torch.Tensor] = []
    per_block = max(1, BLOCK_ELEMENTS // max(1, rows.shape[1]))
    for block in rows.split(per_block):
        b = block if block.dtype == work else block.to(work)  # (rows_in_block, fan_in)
        norms = torch.linalg.vector_norm(b, dim=1)
        lo, hi = torch.aminmax(b)
        scale = max(-float(lo), float(hi))
        if not math.isfinite(float(norms.sum())) and math.isfinite(scale) and scale > 0:
            norms = torch.linalg.vector_norm(b / scale, dim=1) * scale  # squares overflowed, values did not
        row_norms.append(norms.double())
        absmax = scale if math.isnan(scale) or scale > absmax else absmax
        nonzero += int(torch.count_nonzero(b))
    all_norms = torch.cat(row_norms)  # (units,)
    sumsq = float(all_norms.square().sum())
    nan = inf = 0
    if not (math.isfinite(sumsq) and math.isfinite(absmax)):
        for block in rows.split(per_block):
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
    if x.dim() == 2 and x.is_floating_point() and min(shape) >= 2 and stats.finite and spectral_iters > 0:
        stats.spectral = spectral_norm(x, spectral_iters)
    return stats


def _zero_rows(rows: torch.Tensor, norms: np.ndarray) -> np.ndarray:
    """Rows of exact zeros. A zero norm only nominates a row (tiny values can underflow when squared)."""
    mask = norms == 0
    for i in np.flatnonzero(mask):
        mask[i] = not bool(torch.count_nonzero(rows[int(i)]))
    return mask


def spectral_norm(matrix: torch.Tensor, iters: int = SPECTRAL_ITERS) -> float:
    """Estimate the largest singular value of a 2-D tensor by power iteration on W^T W.

    16-bit matrices are multiplied in their own dtype (the CPU kernels accumulate in float32), so no
    float copy of a large bf16 embedding is made; the vectors are normalized in float32.
    """
    mat = matrix if matrix.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) \
        else matrix.float()
    gen = torch.Generator().manual_seed(0)  # deterministic estimate, global RNG untouched
    v = torch.randn(mat.shape[1], generator=gen, dtype=torch.float64)
    v = (v / torch.linalg.vector_norm(v)).to(mat.dtype)
    sigma = 0.0
    for _ in range(iters):
        u = (mat @ v).float()  # (rows,)
        un = float(torch.linalg.vector_norm(u))
        if un == 0.0 or not math.isfinite(un):
            return un if math.isfinite(un) else float("nan")
        w = ((u / un).to(mat.dtype) @ mat).float()  # (cols,) = W^T u
        sigma = float(torch.linalg.vector_norm(w))
        if sigma == 0.0 or not math.isfinite(sigma):
            break
        v = (w / sigma).to(mat.dtype)
    return sigma


def _json_float(value: float) -> float | str:
    """JSON has no NaN/Inf: keep them readable as strings, as gradscope.findings does for evidence."""
    if math.isfinite(value):
        return float(value)
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
