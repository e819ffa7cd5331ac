"""nonfinite: one corrupt sample makes exp() overflow at step 25; gradscope names the layer it started in.

Every layer after it inherits the inf/NaN, and so does the loss; what matters is the first module
whose output went non-finite. Fix: guard the operation (clamp its input, add an eps) and check the data.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import gradscope


class Exp(nn.Module):
    """A hand-written feature transform: exp() overflows for large inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


torch.manual_seed(0)
x_all = torch.randn(2048, 32)
y_all = (x_all @ torch.randn(32, 4)).argmax(1)
x_all[25 * 64] *= 1e4  # the bug in the data: one corrupt sample, first served at step 25

model = nn.Sequential(OrderedDict(
    fc1=nn.Linear(32, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 32), exp=Exp(), head=nn.Linear(32, 4),
))
opt = torch.optim.SGD(model.parameters(), lr=0.01)

with gradscope.watch(model, opt, log_dir="runs/nonfinite", every=1, console=True) as scope:
    for step in range(35):
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
