"""The files a run writes: modes as the user's umask allows (like the event files beside them)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradscope
from gradscope.reporters.json import JSON_NAME, SUMMARY_NAME

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


def _run(log_dir: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, opt, log_dir=log_dir, every=1) as scope:
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(16, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss=loss)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_report_files_get_the_mode_the_umask_allows(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        _run(tmp_path)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    events = [p for p in tmp_path.iterdir() if p.name.startswith("events.out.tfevents")]
    assert events and all(_mode(p) == expected for p in events)
    assert _mode(tmp_path / JSON_NAME) == expected
    assert _mode(tmp_path / SUMMARY_NAME) == expected
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
