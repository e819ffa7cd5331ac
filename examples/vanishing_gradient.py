"""vanishing_gradient: twelve sigmoid layers with default init; the first layers receive no gradient.

Each sigmoid passes back at most 1/4 of the gradient and the default init shrinks it further, so after
twelve layers the first one gets about 1e-10 of what the last one gets. Fix: ReLU/GELU with He init,
normalization, or residual connections.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import gradscope

torch.manual_seed(0)
x_all = torch.randn(2048, 32)
y_all = (x_all @ torch.randn(32, 4)).argmax(1)

layers: OrderedDict[str, nn.Module] = OrderedDict()
for i in range(12):
    layers[f"fc{i}"], layers[f"sig{i}"] = nn.Linear(32, 32), nn.Sigmoid()
layers["head"] = nn.Linear(32, 4)
model = nn.Sequential(layers)
opt = torch.optim.SGD(model.parameters(), lr=0.1)

# every=1: collect every step, as this run is only 60 steps long (the default suits long runs)
with gradscope.watch(model, opt, log_dir="runs/vanishing_gradient", every=1, console=True) as scope:
    for step in range(60):
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
