"""exploding_gradient: a regression trains fine with SGD until its learning rate is raised 100-fold.

From step 40 every update overshoots, the weights grow, and the gradients with them: gradscope dates the
explosion to the step it began and names the layers. Fix: a lower learning rate, warm-up, gradient
clipping (torch.nn.utils.clip_grad_norm_).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import gradscope

torch.manual_seed(0)
x_all = torch.randn(2048, 16)
y_all = x_all @ torch.randn(16, 1) + 0.1 * torch.randn(2048, 1)

model = nn.Sequential(OrderedDict(
    fc1=nn.Linear(16, 64), act1=nn.LeakyReLU(0.2), fc2=nn.Linear(64, 64), act2=nn.LeakyReLU(0.2),
    head=nn.Linear(64, 1),
))
opt = torch.optim.SGD(model.parameters(), lr=0.01)

with gradscope.watch(model, opt, log_dir="runs/exploding_gradient", every=1, console=True) as scope:
    for step in range(60):
        if step == 40:
            opt.param_groups[0]["lr"] = 1.0  # the bug: a schedule that jumps 100x
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.mse_loss(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
