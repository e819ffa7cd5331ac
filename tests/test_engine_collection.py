"""The collection engine measures what it claims: each reduction against a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradscope


def _train(model, opt, steps, scope=None, batch=16, din=8, loss_fn=None):
    losses = []
    for _ in range(steps):
        x = torch.randn(batch, din)
        out = model(x)
        loss = loss_fn(out) if loss_fn else out.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scope is not None:
            scope.step(loss)
        losses.append(loss.item())
    return losses


def test_activation_stats_match_numpy_reference():
    torch.manual_seed(1)
    lin = nn.Linear(8, 64)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(64, 4), nn.Tanh())
    x = torch.randn(32, 8)
    with gradscope.watch(model, every=1) as scope:
        out = model(x)
        out.sum().backward()
        scope.step()
    rec = scope.history.last
    with torch.no_grad():
        h = lin(x).numpy().astype(np.float64)
        r = np.maximum(h, 0)
        t = model(x).numpy().astype(np.float64)
    a0, a1, a3 = rec.activations["0"], rec.activations["1"], rec.activations["3"]
    assert a0.mean == pytest.approx(h.mean(), rel=1e-5, abs=1e-6)
    assert a0.std == pytest.approx(h.std(), rel=1e-4)
    assert a0.rms == pytest.approx(math.sqrt((h * h).mean()), rel=1e-5)
    assert a0.absmax == pytest.approx(np.abs(h).max(), rel=1e-6)
    assert a0.neg_frac == pytest.approx((h < 0).mean())
    assert a1.zero_frac == pytest.approx((r == 0).mean())
    assert a1.neg_frac == 0.0
    # unit axis of a (N, 64) output is the last one: 64 per-unit flags
    assert a1.alive is not None and a1.alive.shape == (64,)
    np.testing.assert_array_equal(a1.alive, (r != 0).any(axis=0))
    lo, hi = -0.9747, 0.9747
    assert a3.saturated_frac == pytest.approx(((t <= lo) | (t >= hi)).mean())
    assert a0.nan == 0 and a0.inf == 0 and a0.numel == 32 * 64


@pytest.mark.parametrize(
    ("nans", "infs", "expected"),
    [
        (1, 0, (1, 0)),
        (0, 4, (0, 4)),
        # both present: min/max propagate NaN, so every non-finite value is counted as NaN
        (1, 4, (5, 0)),
    ],
)
def test_nan_and_inf_are_counted(nans, infs, expected):
    class Poison(nn.Module):
        def forward(self, x):
            x = x.clone()
            x[0, :nans] = float("nan")
            if infs:
                x[1, : infs - 1] = float("inf")
                x[2, 0] = -float("inf")
            return x

    model = nn.Sequential(nn.Linear(4, 8), Poison())
    with gradscope.watch(model, every=1) as scope:
        model(torch.randn(5, 4)).sum().backward()
        scope.step()
    a = scope.history.last.activations["1"]
    assert (a.nan, a.inf) == expected
    assert a.nonfinite == nans + infs
    assert scope.history.last.activations["0"].nonfinite == 0
    assert scope.history.first_nonfinite.layer == "1"


def test_gradient_stats_match_autograd():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(10, 8)
    with gradscope.watch(model, every=1) as scope:
        h = model[0](x)
        h.retain_grad()
        out = model[2](model[1](h))
        out.pow(2).sum().backward()
        scope.step()
    rec = scope.history.last
    assert rec.gradients["0"].norm == pytest.approx(h.grad.norm().item(), rel=1e-5)
    assert rec.gradients["0"].absmax == pytest.approx(h.grad.abs().max().item(), rel=1e-6)
    # backward order: the last layer's output gradient arrives first
    assert rec.gradients["2"].order < rec.gradients["1"].order < rec.gradients["0"].order
    for name, p in model.named_parameters():
        assert rec.params[name].grad_norm == pytest.approx(p.grad.norm().item(), rel=1e-5)
        assert rec.params[name].weight_norm == pytest.approx(p.detach().norm().item(), rel=1e-5)


def test_update_norm_is_the_real_step_for_sgd_momentum():
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        for _ in range(3):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            loss = model(torch.randn(4, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec = scope.history.last
            for n, p in model.named_parameters():
                expected = (p.detach() - before[n]).norm().item()
                assert rec.params[n].update_norm == pytest.approx(expected, rel=1e-5)
                assert rec.params[n].lr == pytest.approx(0.1)
    assert scope.history.steps_seen == 3


def test_global_norm_is_not_a_sum_of_norms():
    # A module called twice: its output-gradient norm is sqrt(|g1|^2 + |g2|^2), not |g1| + |g2|.
    lin = nn.Linear(4, 4)
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, a, b):
            return self.lin(a), self.lin(b)

    model = Twice()
    with gradscope.watch(model, every=1) as scope:
        o1, o2 = model(x1, x2)
        o1.retain_grad()
        o2.retain_grad()
        (o1.pow(2).sum() + 3 * o2.sum()).backward()
        scope.step()
    g = scope.history.last.gradients["lin"]
    expected = math.sqrt(o1.grad.norm().item() ** 2 + o2.grad.norm().item() ** 2)
    assert g.norm == pytest.approx(expected, rel=1e-5)
    assert scope.history.last.activations["lin"].calls == 2
    assert scope.history.last.activations["lin"].numel == 24


def test_conv_units_are_channels():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv1d(2, 7, 1), nn.ReLU())
    with gradscope.watch(model[:2], every=1) as scope:
        model[:2](torch.randn(2, 3, 8, 8)).sum().backward()
        scope.step()
    assert scope.history.last.activations["1"].alive.shape == (5,)
    seq = nn.Sequential(nn.Conv1d(2, 7, 1), nn.ReLU())
    with gradscope.watch(seq, every=1) as scope:
        seq(torch.randn(4, 2, 9)).sum().backward()
        scope.step()
    # a ReLU after a Conv1d inherits the channels-first layout of its (N, C, L) input
    assert scope.history.last.activations["1"].alive.shape == (7,)


def test_batchnorm_input_is_compared_with_running_stats_before_update():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4), bn)
    x = torch.randn(64, 3)
    with gradscope.watch(model, every=1) as scope:
        with torch.no_grad():
            h = model[0](x)
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        model(x).sum().backward()
        scope.step()
    ns = scope.history.last.norms["1"]
    gap = ((h.mean(0) - rm).abs() / torch.sqrt(rv + bn.eps)).max().item()
    lvr = torch.log((h.var(0, unbiased=False) + bn.eps) / (rv + bn.eps)).abs().max().item()
    assert ns.mean_gap_max == pytest.approx(gap, rel=1e-4)
    assert ns.log_var_ratio_max == pytest.approx(lvr, rel=1e-4)
    assert ns.running_var_min == pytest.approx(rv.min().item())
    assert ns.weight_rms == pytest.approx(1.0)
    assert ns.training


def test_loss_is_recorded_for_the_step_it_belongs_to():
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, every=2) as scope:
        losses = _train(model, opt, 5, scope)
        scope.report()
    assert [s for s, _ in scope.history.losses] == [0, 1, 2, 3, 4]
    assert [v for _, v in scope.history.losses] == pytest.approx(losses)
    assert [r.step for r in scope.history.records] == [0, 2, 4]
    assert scope.history.records[1].loss == pytest.approx(losses[2])
    assert scope.history.steps_seen == 5


def test_without_optimizer_scope_step_ends_each_step():
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, every=1) as scope:
        _train(model, opt, 4, scope)
    assert scope.history.steps_seen == 4
    assert [r.step for r in scope.history.records] == [0, 1, 2, 3]
    # without an optimizer gradscope cannot see the update, only the gradient
    assert scope.history.last.params["weight"].update_norm is None
    assert scope.history.last.params["weight"].grad_norm is not None


def test_history_is_bounded():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, every=1, history=8) as scope:
        _train(model, opt, 50, scope, din=4)
        scope.report()
    assert len(scope.history.records) == 8
    assert scope.history.records[-1].step == 49
    assert scope.history.first.step == 0
    assert len(scope.history.losses) <= 32


def test_only_collected_steps_are_measured():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scope = gradscope.watch(model, optimizer=opt, every=3)
    try:
        for step in range(7):
            out = model(torch.randn(4, 8))
            # tensor hooks exist only on collected steps
            assert bool(scope._handles.per_step) == (step % 3 == 0)
            opt.zero_grad()
            out.sum().backward()
            opt.step()
    finally:
        scope.close()
    assert [r.step for r in scope.history.records] == [0, 3, 6]


def test_a_nan_loss_between_collected_steps_is_the_first_nonfinite_event():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradscope.watch(model, optimizer=opt, every=5) as scope:
        for step in range(7):
            loss = model(torch.randn(2, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss * float("nan") if step >= 3 else loss)
            if step == 4:
                with torch.no_grad():
                    model.weight.fill_(float("nan"))  # the model itself goes bad at step 5
    event = scope.history.first_nonfinite
    assert (event.step, event.source, event.layer) == (3, "loss", "")


def test_adam_effective_step_size_is_recorded_per_parameter():
    model = nn.Linear(6, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-8)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 6)).pow(2).mean().backward()
            opt.step()
    beta2 = opt.param_groups[0]["betas"][1]
    for name, p in model.named_parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
        expected = (1e-2 / (v_hat.sqrt() + 1e-8)).pow(2).mean().sqrt().item()
        assert scope.history.last.params[name].adam_step_rms == pytest.approx(expected, rel=1e-4)


def test_the_default_schedule_is_dense_early_and_sparse_later():
    from gradscope.config import Schedule
    from gradscope.schedule import DEFAULT_SCHEDULE, DENSE_START

    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.ones(2, 4)  # the same gradient every step: nothing for a burst to react to
    with gradscope.watch(model, optimizer=opt) as scope:
        for _ in range(301):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    steps = [r.step for r in scope.history.records]
    # every step of the dense start, then every 10th until 200, then every 50th (docs/schedule.md)
    assert steps == [*range(DENSE_START), *range(20, 200, 10), 200, 250, 300]
    assert scope.schedule == DEFAULT_SCHEDULE == Schedule(10, 200, 50, start=DENSE_START, burst=8)
    assert [s for s in range(12) if Schedule(3, 0, 3)(s)] == [0, 3, 6, 9]
