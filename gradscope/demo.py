"""The scenarios of ``gradscope demo``: small models, healthy and broken, trained on synthetic data.

Each scenario is a model with one known problem (or none), trained for a few dozen steps on random
data with gradscope watching. Nothing is downloaded; the whole demo takes about half a minute on a
laptop CPU. This module computes; ``gradscope_cli.demo_cmd`` shows the results.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .findings import Report
from .scope import watch

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Setup:
    """What a scenario trains: the model, its optimizer and how a batch and its loss are made."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[torch.Generator, int], Batch]  # (generator, step) -> (inputs, targets)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(default=lambda out, y: mse(out, y))
    # Inputs for an evaluation forward (model.eval(), no_grad) every EVAL_EVERY steps, where the story needs one.
    evaluate: Callable[[torch.Generator, int], torch.Tensor] | None = None


@dataclass
class Scenario:
    name: str  # also the TensorBoard run name: DIR/<name>
    title: str  # one line: what is wrong with it (or that nothing is)
    build: Callable[[], Setup]
    expect: tuple[str, ...]  # finding kinds gradscope should report; () for the healthy control
    steps: int = 60


@dataclass
class Result:
    scenario: Scenario
    report: Report
    summary: dict[str, Any]
    seconds: float
    log_dir: str | None

    @property
    def found(self) -> set[str]:
        return {f.kind for f in self.report.findings if f.severity != "info"}

    @property
    def caught(self) -> bool:
        """Every expected kind was reported; for the healthy control, nothing above info was."""
        return set(self.scenario.expect) <= self.found if self.scenario.expect else not self.found


# --- synthetic data ----------------------------------------------------------------------------------

IN, OUT = 16, 4
EVAL_EVERY = 10


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


def _regression(gen: torch.Generator, step: int = 0) -> Batch:
    x = torch.randn(64, IN, generator=gen)
    # A fixed smooth target: the first OUT inputs, mixed and squashed (learnable by every model here).
    y = torch.tanh(x[:, :OUT] + 0.5 * x[:, OUT : 2 * OUT])
    return x, y


def _mlp(widths: list[int], act: Callable[[], nn.Module], norm: Callable[[int], nn.Module] | None = None) -> nn.Sequential:
    """fc1, (bn1,) act1, fc2, ... out: named layers, so findings read "dead_relu at act2", not "at 3"."""
    layers: dict[str, nn.Module] = {}
    hidden = len(widths) - 2
    for i, (a, b) in enumerate(pairwise(widths), start=1):
        if i > hidden:
            layers["out"] = nn.Linear(a, b)
            break
        layers[f"fc{i}"] = nn.Linear(a, b)
        if norm is not None:
            layers[f"bn{i}"] = norm(b)
        layers[f"act{i}"] = act()
    return nn.Sequential(OrderedDict(layers))


# --- the scenarios -------------------------------------------------------------------------------------


def _healthy() -> Setup:
    model = _mlp([IN, 64, 64, OUT], nn.ReLU)
    return Setup(model, torch.optim.Adam(model.parameters(), lr=1e-3), _regression)


def _vanishing_sigmoid() -> Setup:
    # Ten sigmoid layers: each multiplies the gradient by at most 1/4 on its way back.
    model = _mlp([IN] + [32] * 10 + [OUT], nn.Sigmoid)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.1), _regression)


def _dead_relu() -> Setup:
    model = _mlp([IN, 64, 64, OUT], nn.ReLU)
    with torch.no_grad():
        model.fc2.bias.fill_(-4.0)  # a bad initialization: most of the second ReLU's units start (and stay) off
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.05), _regression)


def _exploding() -> Setup:
    # The same kind of MLP trains well at lr=0.1; at lr=3 every step overshoots and the gradients grow
    # by orders of magnitude within a few steps, until they overflow.
    model = _mlp([IN, 64, 64, OUT], nn.Tanh)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=3.0), _regression)


def _drifting_batchnorm() -> Setup:
    # The inputs drift while training (a sensor offset creeping up 0.5 per step). Training-mode BatchNorm
    # normalizes each batch by itself and trains fine, but its running statistics (what eval uses) lag
    # behind, so every evaluation on current data is off.
    model = _mlp([IN, 64, 64, OUT], nn.ReLU, norm=nn.BatchNorm1d)
    return Setup(model, torch.optim.Adam(model.parameters(), lr=1e-3), _drifting, evaluate=lambda g, step: _drifting(g, step)[0])


def _drifting(gen: torch.Generator, step: int) -> Batch:
    x, y = _regression(gen)
    return x + 0.5 * step, y


class LogFeatures(nn.Module):
    """A hand-written feature transform with a classic bug: log of values that can be negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # should be torch.log1p(x.abs()) or log of a clamped value


def _nan_source() -> Setup:
    model = nn.Sequential(OrderedDict(
        fc1=nn.Linear(IN, 32), log_features=LogFeatures(), fc2=nn.Linear(32, 32), act2=nn.ReLU(), out=nn.Linear(32, OUT)
    ))
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.05), _regression)


def _not_in_optimizer() -> Setup:
    model = _mlp([IN, 64, 64, OUT], nn.ReLU)
    # The optimizer was built from the body only (a common slip after swapping in a new head).
    params = [p for name, p in model.named_parameters() if not name.startswith("out.")]
    return Setup(model, torch.optim.Adam(params, lr=1e-3), _regression)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("healthy", "a 3-layer ReLU MLP with Adam: the control, nothing to find", _healthy, ()),
    Scenario("vanishing_sigmoid", "ten sigmoid layers deep: the gradient fades towards the input",
             _vanishing_sigmoid, ("vanishing_gradient",)),
    Scenario("dead_relu", "a ReLU layer whose biases start at -4: its units never fire", _dead_relu, ("dead_relu",)),
    Scenario("exploding", "a tanh MLP at a learning rate 30x too high: gradients blow up", _exploding,
             ("exploding_gradient",)),
    Scenario("drifting_batchnorm", "inputs drift during training: BatchNorm's running stats lag behind",
             _drifting_batchnorm, ("normalization_drift",)),
    Scenario("nan_source", "a custom layer takes the log of negative values: NaN from step 0", _nan_source,
             ("nonfinite",)),
    Scenario("not_in_optimizer", "the output layer was left out of the optimizer", _not_in_optimizer,
             ("not_in_optimizer",)),
)


def _evaluate(setup: Setup, gen: torch.Generator, step: int) -> None:
    setup.model.eval()
    with torch.no_grad():
        setup.model(setup.evaluate(gen, step))  # type: ignore[misc]
    setup.model.train()


def scenario(name: str) -> Scenario:
    for s in SCENARIOS:
        if s.name == name:
            return s
    raise KeyError(name)


def run_scenario(s: Scenario, log_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Result:
    """Train one scenario with gradscope watching; TensorBoard logs go to ``log_dir`` when given."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    setup = s.build()
    start = time.perf_counter()
    with watch(setup.model, setup.optimizer, log_dir=log_dir, every=2) as scope:
        for step in range(s.steps):
            x, y = setup.batch(gen, step)
            loss = setup.loss(setup.model(x), y)
            setup.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            setup.optimizer.step()
            scope.step(loss=loss.detach())
            if setup.evaluate is not None and step % EVAL_EVERY == EVAL_EVERY - 1:
                _evaluate(setup, gen, step)
        report = scope.report()
        summary = scope.summary()
    return Result(s, report, summary, time.perf_counter() - start, os.fspath(log_dir) if log_dir else None)


def run_demo(
    log_dir: str | os.PathLike[str] | None,
    names: list[str] | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run the scenarios (all, or those named) in order; logs under ``log_dir/<scenario>``."""
    chosen = [scenario(n) for n in names] if names else list(SCENARIOS)
    results = []
    for s in chosen:
        result = run_scenario(s, Path(log_dir) / s.name if log_dir is not None else None)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
