"""saturated_activation: a tanh behind a layer initialized 30x too large sits at +/-1.

In its flat tails tanh passes back almost no gradient, so the layers before it barely train. Fix: a
sane init (or a lower learning rate), normalize its input, or use ReLU/GELU.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

import gradscope

torch.manual_seed(0)
x_all = torch.randn(2048, 32)
y_all = (x_all @ torch.randn(32, 4)).argmax(1)

model = nn.Sequential(OrderedDict(
    fc1=nn.Linear(32, 64), act1=nn.Tanh(), fc2=nn.Linear(64, 64), act2=nn.ReLU(), head=nn.Linear(64, 4),
))
with torch.no_grad():
    model.fc1.weight.normal_(0.0, 30 / math.sqrt(32))  # the bug: pre-activations ~N(0, 30^2)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

with gradscope.watch(model, opt, log_dir="runs/saturated_activation", every=1, console=True) as scope:
    for step in range(60):
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
