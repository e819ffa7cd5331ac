"""A plain training loop and the Scenario it runs: what every demo scenario (and the tests' zoo) trains."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import SyntheticData

LossFn = Callable[[Tensor, Tensor], Tensor]


def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SyntheticData,
    steps: int,
    scope: Any = None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    lr_at: Callable[[int], float] | None = None,
    eval_data: SyntheticData | None = None,
    eval_every: int = 0,
    autocast: torch.dtype | None = None,
    after_backward: Callable[[int], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> list[float]:
    """A plain training loop; returns the losses. ``lr_at(step)`` multiplies each group's initial lr.

    With a scope, the loss of each step is given to it (``scope.step(loss=...)``). Evaluation forwards
    run under ``torch.no_grad()`` in eval mode every ``eval_every`` steps, as a real loop would.
    ``after_backward(step)`` runs between backward and the optimizer step (to read ``.grad`` in tests).
    With a ``scaler`` (mixed precision), the loss is scaled and the scaler steps and updates.
    """
    base = [g["lr"] for g in optimizer.param_groups]
    losses: list[float] = []
    model.train()
    for step in range(steps):
        if lr_at is not None:
            for g, lr in zip(optimizer.param_groups, base, strict=True):
                g["lr"] = lr * lr_at(step)
        x, y = data.batch(step)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = model(x)
        loss = loss_fn(out.float(), y)
        if scaler is None:
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if after_backward is not None:
                after_backward(step)
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        losses.append(float(loss.detach()))
        if scope is not None:
            scope.step(loss=losses[-1])
        if eval_data is not None and eval_every and (step + 1) % eval_every == 0:
            evaluate(model, eval_data)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: SyntheticData, batches: int = 2) -> None:
    """Evaluation forwards (eval mode, no grad), restoring training mode after."""
    model.eval()
    try:
        for b in range(batches):
            model(data.batch(b)[0])
    finally:
        model.train()


@dataclass
class Scenario:
    """A model, its optimizer and data, and how to train it; ``expect`` is the fault it must be caught as."""

    name: str
    why: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: SyntheticData
    steps: int
    expect: tuple[str, str] | None = None  # (kind, layer); None for a healthy control
    loss_fn: LossFn = F.cross_entropy
    lr_at: Callable[[int], float] | None = None
    eval_data: SyntheticData | None = None
    eval_every: int = 0
    autocast: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @property
    def healthy(self) -> bool:
        return self.expect is None

    def run(self, scope: Any = None, after_backward: Callable[[int], None] | None = None) -> list[float]:
        return train(
            self.model, self.optimizer, self.data, self.steps, scope,
            loss_fn=self.loss_fn, lr_at=self.lr_at, eval_data=self.eval_data,
            eval_every=self.eval_every, autocast=self.autocast, after_backward=after_backward,
            scaler=self.scaler,
        )
