"""loss_divergence: a run that was converging, until its learning rate was raised 10x at step 50.

The loss climbs back up to where it started (no NaN: it just stops learning). gradscope reports the
divergence and the layers whose updates became too large from step 50. Fix: keep the learning rate
where it was, or warm it up; check a resumed run's schedule.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import gradscope

torch.manual_seed(0)
x_all = torch.randn(2048, 32)
y_all = x_all @ torch.randn(32, 1)

model = nn.Sequential(OrderedDict(
    fc1=nn.Linear(32, 64), act1=nn.ReLU(), fc2=nn.Linear(64, 64), act2=nn.ReLU(), head=nn.Linear(64, 1),
))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

with gradscope.watch(model, opt, log_dir="runs/loss_divergence", every=1, console=True) as scope:
    for step in range(100):
        if step == 50:
            opt.param_groups[0]["lr"] = 0.1  # the bug: e.g. a resumed run that lost its schedule
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.mse_loss(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
