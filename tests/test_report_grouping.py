"""The terminal groups a kind's findings over a contiguous run of layers into one row; Report.findings
and gradscope.json keep one finding per layer."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import gradscope
from gradscope.findings import Finding, Report
from gradscope.reporters.grouping import group_findings
from gradscope.reporters.terminal import render_brief, render_report

DEPTH = 14


def _sigmoid_stack() -> nn.Sequential:
    torch.manual_seed(0)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(DEPTH):
        layers[f"fc{i}"], layers[f"sig{i}"] = nn.Linear(32, 32), nn.Sigmoid()
    layers["head"] = nn.Linear(32, 4)
    return nn.Sequential(layers)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    return x, x[:, :4].argmax(1)


def test_a_vanishing_stack_is_one_row_and_one_finding_per_layer(tmp_path: Path) -> None:
    model = _sigmoid_stack()
    x, y = _data()
    # Ground truth in plain torch: the first layer's weight gradient is a vanishing share of the head's.
    F.cross_entropy(model(x[:64]), y[:64]).backward()
    assert model.fc0.weight.grad.norm() < 1e-6 * model.head.weight.grad.norm()
    model.zero_grad()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, log_dir=tmp_path) as scope:
        for step in range(60):
            i = (torch.arange(64) + step * 64) % 512
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            opt.step()
            scope.step(loss=loss)
    report = scope.last_report
    vanishing = [f.layer for f in report.findings if f.kind == "vanishing_gradient"]
    assert len(vanishing) >= 3 and len(set(vanishing)) == len(vanishing)  # one finding per layer, kept
    saved = json.loads((tmp_path / "gradscope.json").read_text())
    assert [f["layer"] for f in saved["findings"] if f["kind"] == "vanishing_gradient"] == vanishing

    console = Console(record=True, width=100)
    render_report(report, console, summary=scope.summary())
    text = console.export_text()
    table = text[text.index("Findings") : text.index("Gradient flow")]
    rows = [line for line in table.splitlines() if line[:4] in ("CRIT", "WARN", "info")]
    assert sum(" vanishing_gradient " in row for row in rows) == 1
    ordered = sorted(vanishing, key=lambda n: int(n[2:]))
    assert f"{ordered[0]} … {ordered[-1]}, {len(vanishing)} layers, from step 0" in table
    # The first row is the report's first finding (the root cause the analyzers put first).
    first = report.findings[0]
    assert rows[0].split()[1] == first.kind
    assert first.message.split()[0] in table  # the lead's own message is shown
    assert len(rows) < len(report.findings)

    brief = Console(record=True, width=100)
    render_brief(report, brief, summary=scope.summary(), first=("vanishing_gradient",))
    assert f"vanishing_gradient at {ordered[0]} … {ordered[-1]} ({len(vanishing)} layers)" in brief.export_text()


def _layers(names: list[str], types: list[str]) -> dict:
    return {n: {"type": t, "order": i} for i, (n, t) in enumerate(zip(names, types, strict=True))}


def test_a_healthy_layer_of_the_same_type_splits_a_run() -> None:
    names = ["fc0", "act0", "fc1", "act1", "fc2", "act2", "fc3"]
    layers = _layers(names, ["Linear", "ReLU"] * 3 + ["Linear"])
    findings = [Finding("vanishing_gradient", "critical", n, 2, f"{n} is small", "fix") for n in ("fc0", "fc1", "fc3")]
    groups = group_findings(findings, layers)
    assert [g.layers for g in groups] == [["fc0", "fc1"], ["fc3"]]  # fc2 is healthy: the run stops there
    assert groups[0].step == 2


def test_groups_keep_the_report_order_and_lead_with_the_worst() -> None:
    names = ["a", "b", "c", "d"]
    layers = _layers(names, ["Linear"] * 4)
    findings = [
        Finding("nonfinite", "critical", "c", 5, "NaN first at c", "fix nan"),
        Finding("vanishing_gradient", "critical", "b", 3, "b small", "fix"),
        Finding("vanishing_gradient", "warning", "a", 1, "a small", "fix"),
        Finding("loss_divergence", "warning", "", 6, "loss rose", "lower lr"),
    ]
    groups = group_findings(findings, layers)
    assert [g.kind for g in groups] == ["nonfinite", "vanishing_gradient", "loss_divergence"]
    van = groups[1]
    assert van.layers == ["a", "b"] and van.lead.layer == "b" and van.severity == "critical" and van.step == 1
    assert van.severity_counts() == {"critical": 1, "warning": 1}
    text = Console(record=True, width=120)
    render_report(Report(findings=findings, steps=7, layers=layers), text)
    out = text.export_text()
    assert "a … b, 2 layers, from step 1 (1 critical, 1 warning)" in out and "b small" in out and "a small" not in out


def test_long_names_are_shown_whole_once_per_group() -> None:
    names = [f"transformer.h.{i}.mlp.c_fc" for i in range(4)]
    layers = _layers(names, ["Linear"] * 4)
    findings = [Finding("dead_relu", "warning", n, 0, "dead", "fix") for n in names]
    console = Console(record=True, width=80)
    render_report(Report(findings=findings, steps=3, layers=layers), console)
    out = console.export_text()
    table = out[out.index("Findings") : out.index("Gradient flow")]
    assert table.count(names[0]) == 1 and table.count(names[-1]) == 1
    assert "t.h.0…3.mlp.c_fc" in table  # the run in the narrow column, shortened as the flow table's names are
    assert "t.h.0.mlp.c_fc" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_a_run_whose_ends_differ_in_shape_names_the_first_and_how_many_more() -> None:
    from gradscope.reporters.terminal import layer_span

    names = ["transformer.wte", "transformer.wpe", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    assert layer_span(names, 22) == "transformer.wte +3"
    assert layer_span(["fc0", "fc1", "fc13"], 22) == "fc0 … fc13"
    assert layer_span([f"transformer.h.{i}.mlp.c_fc" for i in range(12)], 22) == "t.h.0…11.mlp.c_fc"
