"""The optimizer analyzer on real training runs: the problem is really there (checked with plain torch),
gradscope names it at the right layers and steps, and healthy schedules stay silent.

The model is a small tanh regression MLP: with a learning rate 100x too high its weights and loss blow
up exponentially (a ReLU net would mostly kill its units instead, which is dead_relu's business).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import median

import pytest
import torch
from torch import nn

import gradscope
from gradscope.config import Thresholds
from gradscope.findings import Kind, Report
from gradscope.stats.adam import adam_step_rms

TH = Thresholds()
UPDATE, LOSS = Kind.UPDATE_RATIO.value, Kind.LOSS_DIVERGENCE.value
OURS = (UPDATE, LOSS)
LINEAR = ("fc1", "fc2", "head")
HEALTHY_LR = 0.05  # SGD on this task: the loss falls from ~4 to ~0.3 in 100 steps


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def regression_data(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    teacher = torch.tanh(x @ (torch.randn(16, 32, generator=g) / 4)) @ (torch.randn(32, 4, generator=g) / 5)
    return x, 3 * teacher + 0.1 * torch.randn(n, 4, generator=g)


def tanh_mlp() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(16, 64), act1=nn.Tanh(), fc2=nn.Linear(64, 64), act2=nn.Tanh(), head=nn.Linear(64, 4),
    ))


@dataclass
class Run:
    report: Report
    losses: list[float]
    lrs: list[float]  # the learning rate each step was taken with
    ratios: dict[str, list[float]] = field(default_factory=dict)  # by hand: ||w_after - w_before|| / ||w_before||

    def ours(self, kind: str) -> list:
        return self.report.by_kind(kind)

    def loud(self) -> list[tuple[str, str, str]]:
        return [(f.kind, f.layer, f.severity) for f in self.report.findings if f.kind in OURS and f.severity != "info"]


def train(
    make_opt: Callable[..., torch.optim.Optimizer],
    steps: int,
    *,
    schedule: Callable[[torch.optim.Optimizer], object] | None = None,
    change: Callable[[int, torch.optim.Optimizer], None] | None = None,
    every: int = 1,
) -> Run:
    """Train the tanh MLP on minibatches of 32, measuring each Linear layer's relative step by hand."""
    torch.manual_seed(0)
    x, y = regression_data()
    model = tanh_mlp()
    opt = make_opt(model.parameters())
    sched = schedule(opt) if schedule else None
    run = Run(report=Report(), losses=[], lrs=[], ratios={n: [] for n in LINEAR})
    with gradscope.watch(model, optimizer=opt, every=every) as scope:
        for t in range(steps):
            if change:
                change(t, opt)
            i = torch.randint(0, len(x), (32,))
            loss = nn.functional.mse_loss(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            before = {n: model.get_submodule(n).weight.detach().clone() for n in LINEAR}
            run.lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            for n in LINEAR:
                w = model.get_submodule(n).weight.detach()
                run.ratios[n].append(((w - before[n]).norm() / before[n].norm()).item())
            if sched is not None:
                sched.step()  # type: ignore[attr-defined]
            scope.step(loss)
            run.losses.append(loss.item())
        run.report = scope.report()
    return run


def sgd(lr: float, **kw: float) -> Callable[..., torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr, **kw)


def adam(lr: float, **kw: float) -> Callable[..., torch.optim.Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr, **kw)


# --- too large ----------------------------------------------------------------------------------------


def test_lr_100x_too_high_is_critical_at_the_layers_that_blow_up_then_the_loss_diverges():
    run = train(sgd(100 * HEALTHY_LR), 30)
    # The physical facts: some layers' steps are larger than their weights, and the loss explodes.
    blown = {n for n, r in run.ratios.items() if any(v >= TH.update_ratio_critical for v in r if math.isfinite(v))}
    assert blown, run.ratios
    first_finite = [v for v in run.losses if math.isfinite(v)]
    assert max(first_finite) > 1e6 * run.losses[0] or not all(map(math.isfinite, run.losses))

    crit = {f.layer: f for f in run.ours(UPDATE) if f.severity == "critical"}
    assert set(crit) == blown
    for name, f in crit.items():
        # the step it names had a hand-measured ratio at least as large as the threshold
        assert run.ratios[name][f.step] == pytest.approx(f.evidence["update_ratio"], rel=1e-4)
        assert "lower the learning rate" in f.hint.lower() and "warm-up" in f.hint

    (div,) = run.ours(LOSS)
    assert div.severity == "critical" and div.layer == ""
    assert div.step >= min(f.step for f in crit.values())  # the steps blew up first, then the loss


def test_lr_raised_at_step_40_is_found_from_step_40():
    def raise_lr(t: int, opt: torch.optim.Optimizer) -> None:
        if t == 40:
            for g in opt.param_groups:
                g["lr"] *= 100

    run = train(sgd(HEALTHY_LR), 60, change=raise_lr)
    # before step 40 every step was healthy-sized; from 40 on some were larger than the weights
    assert max(max(r[:40]) for r in run.ratios.values()) < 0.1
    assert max(max(r[40:]) for r in run.ratios.values()) > 1.0

    ours = run.ours(UPDATE) + run.ours(LOSS)
    assert any(f.kind == UPDATE and f.severity == "critical" for f in ours)
    assert any(f.kind == LOSS and f.severity == "critical" for f in ours)
    assert all(f.step is not None and f.step >= 40 for f in ours), [(f.kind, f.layer, f.step) for f in ours]


# --- too small ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_opt", [sgd(1e-7), adam(1e-7)], ids=["sgd", "adam"])
def test_lr_1e7_with_a_loss_that_does_not_move_is_a_warning_at_every_layer(make_opt):
    run = train(make_opt, 60)
    # The physical facts: each step moves the weights by far less than 1e-5 of their norm; the loss is flat.
    assert max(max(r) for r in run.ratios.values()) < TH.update_ratio_low
    early, late = sum(run.losses[:15]) / 15, sum(run.losses[-15:]) / 15
    assert abs(early - late) / early < TH.loss_plateau

    found = {f.layer: f for f in run.ours(UPDATE)}
    assert set(found) == set(LINEAR)
    for name, f in found.items():
        assert f.severity == "warning" and f.step == 0
        assert f.evidence["lr_peak"] == pytest.approx(1e-7)
        assert f.evidence["update_ratio"] == pytest.approx(median(run.ratios[name][: TH.update_window]), rel=1e-4)
        assert "too low" in f.hint
    assert run.ours(LOSS) == []


# --- healthy controls ---------------------------------------------------------------------------------


def linear_warmup(n: int) -> Callable[[torch.optim.Optimizer], object]:
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / n))


def cosine_to_zero(n: int) -> Callable[[torch.optim.Optimizer], object]:
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n, eta_min=0.0)


@pytest.mark.parametrize(
    ("make_opt", "schedule"),
    [
        (sgd(HEALTHY_LR), None),
        (sgd(HEALTHY_LR), linear_warmup(30)),
        (adam(1e-3), linear_warmup(30)),
        (sgd(HEALTHY_LR, momentum=0.5), cosine_to_zero(150)),
        (adam(1e-2), cosine_to_zero(150)),
    ],
    ids=["sgd-constant", "sgd-warmup", "adam-warmup", "sgd-momentum-cosine", "adam-cosine"],
)
def test_healthy_schedules_are_silent(make_opt, schedule):
    run = train(make_opt, 150, schedule=schedule)
    peak = max(run.lrs)
    if schedule is not None:
        # The schedule really produced tiny learning rates, and with them tiny steps at one end of the run.
        tiny_lr = run.lrs[0] if run.lrs[0] < run.lrs[-1] else run.lrs[-1]
        assert tiny_lr < 1e-2 * peak
        ends = [r[0] for r in run.ratios.values()] + [r[-1] for r in run.ratios.values()]
        assert min(ends) < 1e-4
    assert sum(run.losses[-20:]) / 20 < 0.25 * sum(run.losses[:20]) / 20  # it trained
    assert run.loud() == []


def test_small_batch_loss_noise_is_not_divergence():
    """Cross-entropy on batches of 4 swings by 10x from step to step; the training itself is fine."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g) + torch.randn(2048, 4, generator=g)).argmax(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    with gradscope.watch(model, optimizer=opt) as scope:
        for _ in range(300):
            i = torch.randint(0, len(x), (4,), generator=g)
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss)
            losses.append(loss.item())
        report = scope.report()
    late = losses[-100:]
    assert max(late) > 10 * min(late)  # the noise is real: 10x swings from batch to batch
    # ... enough that a naive rule (a 5-step median 3x its lowest so far) would call it divergence
    medians = [median(losses[i - 5 : i]) for i in range(25, len(losses))]
    assert any(m >= TH.loss_rise * min(medians[:k]) for k, m in enumerate(medians) if k > 0)
    assert sum(late) / 100 < 0.6 * sum(losses[:20]) / 20  # and the training itself is fine
    assert [f for f in report.findings if f.kind in OURS and f.severity != "info"] == []


# --- the measurement itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opt",
    [
        sgd(0.1),
        sgd(0.1, momentum=0.9, weight_decay=1e-2),
        adam(1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd", "sgd-momentum", "adam", "adamw"],
)
def test_update_ratio_is_the_real_step_for_each_optimizer(make_opt):
    torch.manual_seed(0)
    model = tanh_mlp()
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))  # the lr changes every step
    x, y = regression_data(64)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        for _ in range(4):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            lr = opt.param_groups[0]["lr"]
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            rec = scope.history.last
            for n, p in model.named_parameters():
                expected = ((p.detach() - before[n]).norm() / before[n].norm()).item()
                assert rec.params[n].update_to_weight == pytest.approx(expected, rel=1e-5)
                assert rec.params[n].lr == pytest.approx(lr)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_effective_lr_matches_a_reference_from_the_gradients(cls, amsgrad):
    torch.manual_seed(0)
    model = tanh_mlp()
    lr, beta2, eps = 1e-2, 0.999, 1e-8
    opt = cls(model.parameters(), lr=lr, betas=(0.9, beta2), eps=eps, amsgrad=amsgrad)
    names = {id(p): n for n, p in model.named_parameters()}
    x, y = regression_data(64)
    # Brute force: the second moment built from the gradients with Adam's own recurrence.
    v = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    vmax = {n: torch.zeros_like(t) for n, t in v.items()}
    for t in range(1, 4):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            v[n] = beta2 * v[n] + (1 - beta2) * p.grad.double() ** 2
            vmax[n] = torch.maximum(vmax[n], v[n])
        opt.step()
        got_names, got = adam_step_rms(opt, names)
        got_by_name = dict(zip(got_names, got.tolist(), strict=True))
        assert set(got_by_name) == set(v)
        for n in v:
            second = vmax[n] if amsgrad else v[n]
            step = lr / ((second / (1 - beta2**t)).sqrt() + eps)
            assert got_by_name[n] == pytest.approx(step.pow(2).mean().sqrt().item(), rel=1e-4)


def test_adam_effective_lr_of_a_weight_without_gradient_signal_is_lr_over_eps():
    # Inputs that are all zero give the weight an exactly-zero gradient: v stays 0 and Adam's effective
    # learning rate sits at lr / eps, so the first real gradient it sees becomes a step 1e6 x lr... in size.
    lin = nn.Linear(4, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, eps=1e-8)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.zeros(8, 4)).pow(2).sum().backward()
        opt.step()
    assert lin.weight.grad is not None and lin.weight.grad.abs().max().item() == 0.0
    got = dict(zip(*adam_step_rms(opt, {id(lin.weight): "weight", id(lin.bias): "bias"}), strict=True))
    assert got["weight"].item() == pytest.approx(1e-2 / 1e-8)
    assert got["bias"].item() < 1.0  # the bias had real gradients: an ordinary effective lr


def test_adam_effective_lr_is_empty_for_other_optimizers():
    model = tanh_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    names, values = adam_step_rms(opt, {id(p): n for n, p in model.named_parameters()})
    assert names == [] and values.numel() == 0
