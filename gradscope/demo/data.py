"""Synthetic data for the demo's scenarios: fixed, seeded, in memory, served in deterministic batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SyntheticData:
    """A fixed in-memory dataset served in deterministic batches (no RNG consumed while training)."""

    x: Tensor
    y: Tensor
    batch_size: int

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        n = self.x.shape[0]
        idx = (torch.arange(self.batch_size) + step * self.batch_size) % n
        return self.x[idx], self.y[idx]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def classification(n: int = 2048, dim: int = 32, classes: int = 4, batch: int = 64, seed: int = 0) -> SyntheticData:
    """Labels from a random teacher network: learnable, but not linearly trivial."""
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 64, generator=g) / math.sqrt(dim)
    w2 = torch.randn(64, classes, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return SyntheticData(x, y, batch)


def regression(n: int = 2048, dim: int = 16, batch: int = 64, seed: int = 0) -> SyntheticData:
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g) / math.sqrt(dim)
    return SyntheticData(x, torch.sin(x @ w * 2) + 0.5 * x[:, :1], batch)
