"""update_ratio: a learning rate of 1e-7; every step changes the weights by ~1e-7 of their size.

Healthy training usually moves each layer by about 1e-3 of its weight norm per step. Here the loss does
not move, and gradscope says why: the steps are far too small. (Tiny steps during warm-up or at the end
of a cosine decay are by design, and not reported.) Fix: raise the learning rate.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import gradscope

torch.manual_seed(0)
x_all = torch.randn(2048, 32)
y_all = (x_all @ torch.randn(32, 4)).argmax(1)

model = nn.Sequential(OrderedDict(
    fc1=nn.Linear(32, 64), act1=nn.ReLU(), fc2=nn.Linear(64, 64), act2=nn.ReLU(), head=nn.Linear(64, 4),
))
opt = torch.optim.Adam(model.parameters(), lr=1e-7)  # the bug: 1e-7 where 1e-3 was meant

with gradscope.watch(model, opt, log_dir="runs/update_ratio", every=1, console=True) as scope:
    for step in range(100):
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
