"""Lines the terminal adds from the run summary and a finding's evidence: clipping that acted, findings
folded into a root, the gate that lowered a finding to info."""

from __future__ import annotations

import torch
from rich.console import Console
from torch import nn

import gradscope
from gradscope.findings import Finding, Report
from gradscope.reporters.terminal import render_report


def _text(report: Report, summary: dict | None = None) -> str:
    console = Console(record=True, width=100)
    render_report(report, console, summary=summary)
    return console.export_text()


def test_clipping_that_acted_is_said_in_the_summary() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 8) * 10
    norms = []
    with gradscope.watch(model, opt, every=1) as scope:
        for _ in range(6):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), 0.1)))  # the norm before clipping
            opt.step()
            scope.step(loss=loss)
    assert all(n > 0.1 for n in norms)  # ground truth: the clip acted on every step
    summary = scope.summary()
    assert summary["clipping"]["clipped_share"] == 1.0
    text = _text(scope.last_report, summary)
    assert "gradient clipping acted on 100% of collected steps" in text


def test_folded_findings_and_gates_are_noted() -> None:
    root = Finding("nonfinite", "critical", "exp", 25, "NaN first at exp.", "Clamp the input.",
                   {"folded": "vanishing_gradient@fc1,dead_relu@act1", "folded_count": 2})
    gated = Finding("dead_relu", "info", "act2", 3, "act2 is quiet.", "Nothing to do.", {"gate": "loss improving"})
    text = _text(Report(findings=[root, gated], steps=30, layers={}))
    assert "explains 2 later findings folded into it" in text
    assert "lowered to info: loss improving" in text
