"""dead_relu: a ReLU layer whose units output zero for every sample, so they never learn again.

Here the cause is a bias initialized to -10 (the pre-activations sit around -10); in practice it is
usually a learning rate too high early on, or a bad init. Fix: He init, a lower learning rate,
LeakyReLU/GELU.
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
with torch.no_grad():
    model.fc2.bias.fill_(-10.0)  # the bug: every unit of act2 starts (and stays) off
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

with gradscope.watch(model, opt, log_dir="runs/dead_relu", every=1, console=True) as scope:
    for step in range(60):
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
