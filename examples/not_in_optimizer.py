"""not_in_optimizer: a layer gets gradients but is in no param group, so it never trains.

A common slip after adding or swapping a layer: the optimizer was built from a hand-made list. Fix:
build it from model.parameters(), or freeze the layer on purpose with requires_grad_(False).
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
opt = torch.optim.Adam([*model.fc1.parameters(), *model.head.parameters()], lr=1e-3)  # the bug: fc2 forgotten

with gradscope.watch(model, opt, log_dir="runs/not_in_optimizer", every=1, console=True) as scope:
    for step in range(40):
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
