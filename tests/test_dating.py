"""A loss blow-up is dated to the step it began at the default schedule, and leads the NaN it caused."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gradscope


def _run(watch: bool) -> tuple[list[float], gradscope.Report | None]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    target = torch.randn(16, 4, generator=g)
    losses: list[float] = []
    scope = gradscope.watch(model, optimizer=opt) if watch else None
    for t in range(100):
        if t == 43:  # the learning rate is raised 100x: the step 43 update blows the model up
            for group in opt.param_groups:
                group["lr"] = 5.0
        x = torch.randn(32, 16, generator=g)
        loss = F.mse_loss(model(x), x @ target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scope is not None:
            scope.step(loss)
        losses.append(loss.item())
    report = None
    if scope is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the NaN steps' own warnings are not what this test is about
            scope.close()
        report = scope.last_report
    return losses, report


def test_loss_blow_up_dated_where_it_began_and_leads_the_nan():
    losses, _ = _run(watch=False)
    # Ground truth in plain torch: the first loss ten times the one before it.
    began = next(t for t in range(1, len(losses)) if losses[t] > 10 * losses[t - 1])
    assert began == 44
    watched, report = _run(watch=True)
    assert all(a == b or (a != a and b != b) for a, b in zip(watched, losses, strict=True))  # bit-identical
    assert report is not None
    (div,) = [f for f in report.findings if f.kind == "loss_divergence"]
    assert div.step == began and div.evidence["noticed_step"] > began
    assert f"from step {began}" in div.message
    # The root leads: the divergence (and what was folded into it) before the NaN it turned into.
    first = report.findings[0]
    nan = [f for f in report.findings if f.kind == "nonfinite"]
    assert first.severity == "critical" and first.step is not None and first.step <= began + 1
    assert not nan or nan[0].step > first.step
