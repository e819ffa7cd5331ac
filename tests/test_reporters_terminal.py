"""The rich terminal report, read back as text from a recording Console."""

from __future__ import annotations

import io
import math

import torch
from rich.console import Console
from torch import nn

import gradscope
from gradscope.findings import Finding, Report
from gradscope.reporters.terminal import (
    MAX_LAYERS,
    decade_range,
    fmt,
    log_bar,
    print_report,
    render_brief,
    render_report,
    shorten,
    verdict,
)

LONG = "encoder.layers.11.self_attn.out_proj"


def _report() -> Report:
    names = ["net.0", "net.1", "net.2", "net.3", LONG, "head"]
    types = ["Linear", "Sigmoid", "Linear", "ReLU", "Linear", "Linear"]
    roles = ["linear", "saturating", "linear", "relu", "linear", "linear"]
    grads = [1e-9, 1e-7, 1e-5, 1e-3, 1e-1, 10.0]
    layers = {"net": {"type": "Sequential", "role": "container", "order": -1}}
    for i, (name, typ, role) in enumerate(zip(names, types, roles, strict=True)):
        layers[name] = {
            "type": typ,
            "role": role,
            "order": i,
            "grad_norm": grads[i],
            "act_rms": 0.5,
            "dead_frac": 0.95 if role == "relu" else None,
            "saturated_frac": 0.75 if role == "saturating" else None,
            "update_ratio": 2e-3 if typ == "Linear" else None,
        }
    findings = [
        Finding("vanishing_gradient", "critical", "net.0", 12, "The gradient at net.0 is 1e-09.", "Use ReLU instead of Sigmoid."),
        Finding("dead_relu", "warning", "net.3", 30, "95% of units in net.3 never fire.", "Lower the learning rate."),
        Finding("unused_parameter", "info", LONG, None, "out_proj.bias never got a gradient.", "Freeze it."),
    ]
    return Report(findings=findings, steps=200, layers=layers)


SUMMARY = {
    "steps": 200,
    "collected": 20,
    "loss_first": 2.5,
    "loss_last": 0.125,
    "loss_curve": [2.5, 2.0, 1.0, 0.5, 0.25, 0.125],
    "lrs_first": [1e-4],
    "lrs": [1e-3],
    "lr_curves": [[1e-4, 5e-4, 1e-3, 1e-3]],
}


def _text(report: Report, width: int = 100, summary: dict | None = None) -> str:
    console = Console(record=True, width=width)
    render_report(report, console, summary=summary)
    return console.export_text()


def _flow_rows(text: str) -> list[str]:
    """The body rows of the gradient-flow table: between its header rule and its legend."""
    flow = text[text.index("Gradient flow") :].splitlines()
    start = next(i for i, line in enumerate(flow) if line.startswith("───")) + 1
    end = next(i for i, line in enumerate(flow) if line.startswith("dead|sat:"))
    return flow[start:end]


def test_summary_findings_and_flow_are_all_shown() -> None:
    text = _text(_report(), summary=SUMMARY)
    assert "✖ 1 critical, 1 warning. First: vanishing_gradient at net.0 (step 12)." in text
    assert "200 steps seen · 7 layers watched · statistics from 20 collected steps" in text
    assert "skipped" not in text  # no skipped optimizer steps: not mentioned
    skipped = _text(_report(), summary={**SUMMARY, "skipped_steps": 3})
    assert "│ 3 optimizer steps skipped (inf/NaN gradients)" in skipped
    assert "loss 2.5 → 0.125" in text
    assert "lr 1.0e-04 → 1.0e-03" in text
    for f in _report().findings:
        assert f.kind in text and f.message in text and "→ " + f.hint in text
    assert "CRIT" in text and "WARN" in text and "info" in text
    # the step each was first seen; "—" for the one without a step
    crit_line = next(line for line in text.splitlines() if line.startswith("CRIT"))
    assert " 12 " in crit_line


def test_flow_table_is_in_model_order_with_log_bars() -> None:
    rows = _flow_rows(_text(_report()))
    # too long for its column at 100 columns: the outer modules become initials, the last two parts stay whole
    names = ["net.0", "net.1", "net.2", "net.3", "e.l.11.self_attn.out_proj", "head"]
    assert len(rows) == len(names)  # the container "net" is left out: it only repeats its last child
    for row, name in zip(rows, names, strict=True):
        assert name in row
    # Each layer's gradient is 100x the one before: on a log scale every bar is longer by the same step.
    bars = [row.count("█") for row in rows]
    assert bars == sorted(bars) and len(set(bars)) == len(bars)
    assert "1.0e-09" in rows[0] and "10" in rows[-1]
    # dead share for the ReLU row, saturated share for the Sigmoid row, the update ratio for Linear rows
    assert "95%" in rows[3] and "75%" in rows[1] and "2.0e-03" in rows[0]
    # severity marks on the rows that have findings
    assert rows[0].startswith("✖") and rows[3].startswith("▲") and rows[4].startswith("·")


def test_readable_at_80_columns_with_long_names_shortened() -> None:
    text = _text(_report(), width=80, summary=SUMMARY)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "e.l.11.self_attn.out_proj" in text or "…self_attn.out_proj" in text
    assert LONG in text  # the full name, once, beside the shortened one
    assert "vanishing_gradient" in text and "95%" in text


def test_no_colour_codes_when_not_a_terminal() -> None:
    out = io.StringIO()
    print_report(_report(), Console(file=out, width=100), summary=SUMMARY)
    assert "\x1b[" not in out.getvalue()
    assert "vanishing_gradient" in out.getvalue()
    coloured = io.StringIO()
    print_report(_report(), Console(file=coloured, width=100, force_terminal=True))
    assert "\x1b[" in coloured.getvalue()  # the same report in a terminal is coloured


def test_renders_the_same_from_its_json_form() -> None:
    report = _report()
    again = Report.from_dict(report.to_dict())
    assert _text(again, summary=SUMMARY) == _text(report, summary=SUMMARY)


def test_missing_and_nonfinite_values() -> None:
    report = Report(steps=3, layers={"a": {"type": "Linear", "grad_norm": float("nan")}, "b": {"type": "ReLU"}})
    text = _text(report)
    row_a = next(line for line in text.splitlines() if " a " in line)
    row_b = next(line for line in text.splitlines() if " b " in line)
    assert "nan" in row_a and "!" in row_a  # a non-finite gradient has a warning bar, not a length
    assert row_b.count("—") >= 3  # nothing measured: dashes, not zeros
    assert "✔ Healthy: no problems found." in text


def test_healthy_verdict_mentions_notes() -> None:
    info = Finding("unused_parameter", "info", "x", None, "m", "h")
    assert str(verdict(Report(findings=[info]))) == "✔ Healthy: no problems found (1 note below)."
    warn = Finding("dead_relu", "warning", "r", 4, "m", "h")
    assert str(verdict(Report(findings=[warn, info]))) == "▲ 1 warning. First: dead_relu at r (step 4)."


def test_many_layers_keep_every_layer_with_a_finding() -> None:
    n = MAX_LAYERS * 3
    layers = {f"blocks.{i}.fc": {"type": "Linear", "grad_norm": 1.0, "order": i} for i in range(n)}
    late = f"blocks.{n - 2}.fc"
    report = Report(findings=[Finding("dead_relu", "warning", late, 1, "m", "h")], steps=5, layers=layers)
    text = _text(report, width=100)
    assert late in text
    assert f"showing {MAX_LAYERS} of {n} layers" in text
    assert sum("blocks." in line and "Linear" in line for line in text.splitlines()) == MAX_LAYERS


def test_formatting_helpers() -> None:
    assert fmt(None) == "—" and fmt(float("nan")) == "nan" and fmt(float("-inf")) == "-inf" and fmt(0.0) == "0"
    assert fmt(0.0123) == "0.0123" and fmt(12.34) == "12.3" and fmt(1.5e-5) == "1.5e-05"
    assert shorten("a.b", 10) == "a.b"
    assert shorten(LONG, 25) == "e.l.11.self_attn.out_proj"
    assert shorten(LONG, 22) == "…11.self_attn.out_proj"
    assert shorten(LONG, 19) == "…self_attn.out_proj"
    assert shorten(LONG, 10) == "…" + LONG[-9:]
    # one way everywhere: names of one block are shortened alike, whatever their leaf's length
    assert shorten("transformer.h.0.attn.c_attn.bias", 24) == "t.h.0.a.c_attn.bias"
    assert shorten("transformer.h.0.attn.c_attn.weight", 24) == "t.h.0.a.c_attn.weight"
    assert shorten("bert.encoder.layer.0.attention.output.LayerNorm.bias", 30) == "b.e.l.0.a.o.LayerNorm.bias"
    assert decade_range([1e-9, 10.0]) == (-9, 2)  # 10 sits exactly on a decade: one decade of headroom
    assert decade_range([0.5]) == (-2, 0)  # at least two decades wide
    assert decade_range([None, float("nan"), 0.0]) == (-2, 0)
    # a value on the lower decade still shows one eighth; the top value fills the bar
    assert log_bar(1e-9, -9, 1, 10).rstrip() == "▏"
    assert log_bar(10.0, -9, 1, 10) == "█" * 10
    assert log_bar(1e-4, -9, 1, 10) == "█" * 5 + " " * 5  # log10 halfway between the decades
    assert log_bar(math.inf, -9, 1, 4) == "!!!!"


def test_watch_console_prints_on_close() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    console = Console(record=True, width=100)
    with gradscope.watch(model, opt, every=1, console=console) as scope:
        for _ in range(5):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
    text = console.export_text()
    assert "5 steps seen" in text and "3 layers watched" in text
    assert [row.split()[:2] for row in _flow_rows(text)] == [["0", "Linear"], ["1", "ReLU"], ["2", "Linear"]]


def test_brief_leads_with_the_kinds_asked_for() -> None:
    console = Console(record=True, width=100)
    render_brief(_report(), console, summary=SUMMARY, first=("dead_relu",), limit=1)
    lines = console.export_text().splitlines()
    assert lines[0] == "  WARN dead_relu at net.3, step 30"
    assert lines[1].strip() == "95% of units in net.3 never fire."
    assert lines[2].strip() == "→ Lower the learning rate."
    assert lines[3].strip() == "also: vanishing_gradient ×1, unused_parameter ×1"
    assert lines[4].strip() == "loss 2.5 → 0.125 over 200 steps"


def test_a_fix_shared_by_several_findings_is_shown_once() -> None:
    same = [Finding("vanishing_gradient", "critical", f"fc{i}", 0, f"fc{i} gets no gradient.", "Use ReLU.") for i in range(3)]
    text = _text(Report(findings=same, steps=10))
    assert text.count("→ Use ReLU.") == 1
    assert all(f"fc{i} gets no gradient." in text for i in range(3))
