"""The terminal report says which layers gradscope stopped measuring, and why (Report.layers "unmeasured")."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from torch import nn

import gradscope
from gradscope.errors import GradscopeWarning
from gradscope.reporters.terminal import render_report
from gradscope.stats import reductions


def test_a_layer_that_failed_is_named_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    real = reductions.activation_stats

    def broken(x: torch.Tensor, *args: object, **kwargs: object) -> object:
        if x.shape[-1] == 1:
            raise RuntimeError("injected failure")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(reductions, "activation_stats", broken)
    with pytest.warns(GradscopeWarning, match="injected failure"), gradscope.watch(model, opt, every=1) as scope:
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(8, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
    console = Console(record=True, width=100)
    render_report(scope.last_report, console, summary=scope.summary())
    lines = [line for line in console.export_text().splitlines() if line.startswith("not measured:")]
    assert len(lines) == 1 and lines[0].startswith("not measured: 2:") and "injected failure" in lines[0]
