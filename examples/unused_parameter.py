"""unused_parameter: an auxiliary head is defined (and optimized) but forward() never calls it.

Its parameters require gradients but never receive one: wasted memory, and DistributedDataParallel
would fail on them. A frozen stem (requires_grad=False) is not a finding: that is intended.
"""

from __future__ import annotations

import torch
from torch import nn

import gradscope


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(32, 64).requires_grad_(False)  # frozen on purpose: fine
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 4)
        self.aux = nn.Linear(64, 4)  # the bug: defined, never used in forward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


torch.manual_seed(0)
x_all = torch.randn(2048, 32)
y_all = (x_all @ torch.randn(32, 4)).argmax(1)
model = Net()
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

with gradscope.watch(model, opt, log_dir="runs/unused_parameter", every=1, console=True) as scope:
    for step in range(40):
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
