"""Shared fixtures: every test starts from a fixed seed and leaves no scope open."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """Small models on 2 shared cores train faster single-threaded, and leave the other core to the rest.
    The caller's thread count comes back afterwards (some reductions' results depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
