"""Gradient accumulation: a loop that divides each micro-batch's loss by k (nanoGPT's convention) passes
watch(accumulation=k), and the report shows the loss the program prints, not a k-th of it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope.errors import UsageError

K = 4


def test_the_report_shows_the_undivided_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8 * K * 20, 8)
    y = x[:, :1] * 2
    printed = []  # what the program itself prints: the last micro-batch's loss, multiplied back
    with gradscope.watch(model, opt, accumulation=K) as scope:
        for step in range(20):
            for micro in range(K):
                i = slice((step * K + micro) * 8, (step * K + micro + 1) * 8)
                loss = ((model(x[i]) - y[i]) ** 2).mean() / K  # scaled for accumulation
                loss.backward()
            opt.step()
            opt.zero_grad()
            printed.append(float(loss.detach()) * K)
            scope.step(loss=loss)
    summary = scope.summary()
    assert summary["loss_first"] == pytest.approx(printed[0], rel=1e-6)
    assert summary["loss_last"] == pytest.approx(printed[-1], rel=1e-6)
    assert [v for _, v in scope.history.losses] == pytest.approx(printed, rel=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_accumulation_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(UsageError, match="accumulation"):
        gradscope.watch(nn.Linear(2, 2), accumulation=bad)
