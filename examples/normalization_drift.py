"""normalization_drift: BatchNorm evaluated on inputs preprocessed differently from training.

Training data is standardized; the evaluation pipeline forgot to, so its features arrive with mean 5
and std 20. In eval mode BatchNorm normalizes with its running statistics, which describe the training
data only. Fix: preprocess eval data exactly like training data.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import gradscope

torch.manual_seed(0)
x_all = torch.randn(2048, 32)
y_all = (x_all @ torch.randn(32, 4)).argmax(1)
x_eval = torch.randn(256, 32) * 20 + 5  # the bug: not standardized like x_all

model = nn.Sequential(OrderedDict(
    bn0=nn.BatchNorm1d(32), fc1=nn.Linear(32, 64), act1=nn.ReLU(), head=nn.Linear(64, 4),
))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

with gradscope.watch(model, opt, log_dir="runs/normalization_drift", every=1, console=True) as scope:
    for step in range(60):
        i = torch.arange(step * 64, step * 64 + 64) % len(x_all)
        loss = nn.functional.cross_entropy(model(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        if step % 10 == 9:  # a validation pass, as a real loop would make
            model.eval()
            with torch.no_grad():
                model(x_eval)
            model.train()
