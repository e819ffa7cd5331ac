"""The ten-line integration: wrap an ordinary training loop with gradscope.watch().

    python examples/wrap_training_loop.py
    tensorboard --logdir runs/wrap_training_loop      # the dashboards
    gradscope report runs/wrap_training_loop          # the terminal report again
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradscope

torch.manual_seed(0)
x_all = torch.randn(4096, 20)
y_all = (x_all[:, :5].sum(1) > 0).long()  # a simple synthetic classification task
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()
loader = DataLoader(TensorDataset(x_all, y_all), batch_size=64, shuffle=True)

# --- the integration: these ten lines are all a training loop needs -----------------------------------
with gradscope.watch(model, optimizer=opt, log_dir="runs/wrap_training_loop", console=True) as scope:
    for _epoch in range(5):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()  # with an optimizer, each step() ends one training step
            scope.step(loss=loss)  # optional: attach the loss to that step
# -------------------------------------------------------------------------------------------------------

report = scope.report()  # the same report, as data
print(f"ok={report.ok}, {len(report.findings)} findings; logs in runs/wrap_training_loop")
