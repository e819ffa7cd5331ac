"""The run summary and its terminal lines: the loss from the run's real start, whole-run curves in bounded
memory, and sparklines drawn from the ``[step, value]`` pairs the summary holds."""

from __future__ import annotations

import itertools
import math

import torch
from rich.console import Console
from torch import nn

import gradscope
from gradscope.reporters.terminal import curve_values, render_report, sparkline
from gradscope.stats.history import CURVE_POINTS, Downsampled


def _train(steps: int, history: int, lr: float = 0.05, nan_at: int | None = None) -> tuple[gradscope.Report, dict, list[float], object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * steps))
    x = torch.randn(64, 8)
    y = x[:, :1] * 2
    losses = []
    with gradscope.watch(model, opt, history=history) as scope:
        for step in range(steps):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            if nan_at is not None and step >= nan_at:
                loss = loss * float("nan")
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            scope.step(loss=loss)
    return scope.last_report, scope.summary(), losses, scope


def test_summary_starts_where_the_run_began_not_where_the_ring_does() -> None:
    # history=4 keeps 16 losses in the ring: 400 steps push the first ones out of it long before the end.
    _, summary, losses, scope = _train(steps=400, history=4)
    assert scope.history.losses[0][0] > 0  # the ring really has lost the start
    assert summary["loss_first"] == losses[0]
    assert summary["loss_first_step"] == 0
    assert summary["loss_last"] == losses[-1]
    assert summary["loss_min"] == min(losses)
    curve = summary["loss_curve"]
    assert curve[0] == [0, losses[0]] and curve[-1] == [399, losses[-1]]
    assert all(len(p) == 2 and p[1] == losses[p[0]] for p in curve)  # every point is a real (step, loss)
    lr = summary["lr_curves"][0]
    assert lr[0][0] == 0 and lr[0][1] == 0.05  # the schedule from its first step, not the ring's
    assert len(lr) > 1 and all(a[1] > b[1] for a, b in itertools.pairwise(lr))


def test_terminal_sparklines_are_curves_not_nonfinite_markers() -> None:
    report, summary, losses, _ = _train(steps=120, history=8)
    console = Console(record=True, width=100)
    render_report(report, console, summary=summary)
    text = console.export_text()
    loss_line = next(line for line in text.splitlines() if "loss " in line)
    assert f"{losses[0]:.3g}" in loss_line and "!" not in loss_line
    assert any(c in loss_line for c in "▁▂▃▄▅▆▇█")
    lr_line = next(line for line in text.splitlines() if "lr " in line)
    assert any(c in lr_line for c in "▁▂▃▄▅▆▇█")  # the schedule decays: its sparkline is drawn


def test_a_nan_loss_shows_in_the_curve_where_it_happened() -> None:
    _, summary, losses, _ = _train(steps=300, history=4, nan_at=250)
    values = curve_values(summary["loss_curve"])
    assert values[0] == losses[0]
    assert math.isnan(values[-1])
    first_bad = next(i for i, v in enumerate(values) if math.isnan(v))
    assert all(math.isfinite(v) for v in values[:first_bad])
    assert sparkline(values).plain.count("!") == sum(math.isnan(v) for v in values)
    assert summary["loss_min"] == min(losses[:250])


def test_downsampled_curve_is_bounded_and_spans_the_run() -> None:
    curve = Downsampled()
    for step in range(100_000):
        curve.add(step, 1.0 / (step + 1))
    assert len(curve.points) <= CURVE_POINTS
    assert curve.points[0] == (0, 1.0)
    assert curve.points[-1][0] > 100_000 - 2 * curve.stride
    gaps = {b[0] - a[0] for a, b in itertools.pairwise(curve.points)}
    assert gaps == {curve.stride}  # evenly spaced


def test_downsampled_curve_keeps_the_step_a_run_broke() -> None:
    curve = Downsampled(limit=32)
    for step in range(10_000):
        curve.add(step, float("nan") if step >= 7_777 else 1.0)
    assert len(curve.points) <= 32 + 16
    bad = [s for s, v in curve.points if math.isnan(v)]
    assert bad[0] == 7_777
