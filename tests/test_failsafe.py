"""An error inside any gradscope hook never reaches training: that statistic goes off for that layer only,
one GradscopeWarning names it, the report says what was not measured, and training stays bit-identical."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import gradscope
from gradscope import scope as scope_module
from gradscope.errors import GradscopeWarning
from gradscope.stats import params as params_module
from gradscope.stats import reductions
from gradscope.stats.packing import Pack


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def _train(watch_kwargs: dict | None, steps: int = 4, scaler: bool = False):
    """Train a small model; return losses, final weights, gradients and the scope (None when unwatched)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    amp = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None
    kwargs = dict(watch_kwargs or {})
    if amp is not None and watch_kwargs is not None:
        kwargs["scaler"] = amp
    scope = gradscope.watch(model, optimizer=opt, every=1, **kwargs) if watch_kwargs is not None else None
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        if amp is not None:
            amp.scale(loss).backward()
            amp.step(opt)
            amp.update()
        else:
            loss.backward()
            opt.step()
        if scope is not None:
            scope.step(loss)
        losses.append(loss.detach().clone())
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 8, generator=g))
    model.train()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if scope is not None:
        scope.report()
        scope.close()
    return losses, state, grads, scope


def _assert_identical(a, b) -> None:
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    for part in (1, 2):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k


def _raise_for(width: int, fn):
    """``fn`` that raises for tensors whose last dimension is ``width`` (one layer of _model())."""

    def broken(x, *args, **kwargs):
        if x.shape[-1] == width:
            raise RuntimeError("injected failure")
        return fn(x, *args, **kwargs)

    return broken


def test_an_error_in_a_forward_hook_disables_that_layers_outputs_only(monkeypatch):
    plain = _train(None)
    monkeypatch.setattr(reductions, "activation_stats", _raise_for(16, reductions.activation_stats))
    with pytest.warns(GradscopeWarning) as caught:
        seen = _train({})
    messages = [str(w.message) for w in caught if issubclass(w.category, GradscopeWarning)]
    assert len(messages) == 2  # one per failing layer: 3 (Linear) and 4 (Tanh), both 16 wide
    assert "layer '3' (Linear)" in messages[0] and "injected failure" in messages[0]
    assert "layer '4' (Tanh)" in messages[1]
    _assert_identical(plain, seen)
    scope = seen[3]
    rec = scope.history.last
    assert "3" not in rec.activations and "4" not in rec.activations
    assert {"0", "2", "5"} <= rec.activations.keys()
    assert set(rec.gradients) == {"0", "1", "2", "3", "4", "5"}  # gradients of every layer still measured
    assert "activations not measured from step 0" in scope.history.unmeasured["3"]
    layers = scope.last_report.to_dict()["layers"]
    assert "injected failure" in layers["3"]["unmeasured"]
    json.loads(scope.last_report.to_json())
    from gradscope.reporters.terminal import print_report

    print_report(scope.last_report, Console(record=True, width=100), summary=scope.summary())


def test_an_error_in_a_gradient_tensor_hook_never_reaches_backward(monkeypatch):
    plain = _train(None)
    monkeypatch.setattr(reductions, "grad_stats", _raise_for(32, reductions.grad_stats))
    with pytest.warns(GradscopeWarning, match="output-gradient statistics"):
        seen = _train({})
    _assert_identical(plain, seen)
    rec = seen[3].history.last
    assert not {"0", "1", "2"} & rec.gradients.keys()
    assert {"3", "4", "5"} <= rec.gradients.keys()
    assert {"0", "1", "2"} <= rec.activations.keys()


def test_an_error_in_a_normalization_pre_hook(monkeypatch):
    plain = _train(None)

    def broken(x):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(reductions, "norm_input_stats", broken)
    with pytest.warns(GradscopeWarning, match=r"layer '1' \(BatchNorm1d\)"):
        seen = _train({})
    _assert_identical(plain, seen)
    scope = seen[3]
    assert not scope.history.last.norms and not scope.history.last.eval_norms
    assert "norm inputs" in scope.history.unmeasured["1"]


def test_an_error_in_the_optimizer_pre_hook(monkeypatch):
    plain = _train(None)

    def broken(named):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(scope_module, "param_batch", broken)
    with pytest.warns(GradscopeWarning, match="parameter gradient and weight norms of the model"):
        seen = _train({})
    _assert_identical(plain, seen)
    rec = seen[3].history.last
    assert not rec.params and rec.activations and rec.gradients
    assert "parameters" in seen[3].history.unmeasured[""]


def test_an_error_in_the_optimizer_post_hook(monkeypatch):
    plain = _train(None)

    def broken(self):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(params_module.UpdateProbe, "finish", broken)
    with pytest.warns(GradscopeWarning, match="optimizer update sizes"):
        seen = _train({})
    _assert_identical(plain, seen)
    rec = seen[3].history.last
    assert all(p.update_norm is None and p.grad_norm is not None for p in rec.params.values())


def test_an_error_in_the_scaler_hook(monkeypatch):
    plain = _train(None, scaler=True)
    original = scope_module.Scope._scaler_updated

    def broken(self):
        original(self)
        raise RuntimeError("injected failure")

    monkeypatch.setattr(scope_module.Scope, "_scaler_updated", broken)
    with pytest.warns(GradscopeWarning, match="GradScaler"):
        seen = _train({}, scaler=True)
    _assert_identical(plain, seen)
    assert seen[3].history.steps_seen == 4


def test_an_error_while_packing_a_step_loses_that_step_not_the_run(monkeypatch):
    plain = _train(None)
    calls = {"n": 0}
    original = Pack.transfer

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pack, "transfer", flaky)
    with pytest.warns(GradscopeWarning, match="statistics of whole steps"):
        seen = _train({})
    _assert_identical(plain, seen)
    assert [r.step for r in seen[3].history.records] == [0, 2, 3]


def test_histograms_of_activations_reach_the_record():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    x = torch.randn(32, 8)
    with gradscope.watch(model, every=1, histograms=True) as scope:
        model(x).sum().backward()
        scope.step()
    rec = scope.history.last
    with torch.no_grad():
        h = model[0](x)
    want = h.reshape(-1)[:: (h.numel() // 1024)][:1024]
    assert rec.activations["0"].sample is not None
    np.testing.assert_array_equal(rec.activations["0"].sample, want.numpy())
    assert rec.activations["1"].sample is not None and rec.gradients["0"].sample is not None


def _fp16_run(scaler_given: bool, steps: int = 40):
    """A healthy autocast-fp16 run whose GradScaler starts far too high: its first steps overflow and are
    skipped (the scale halves each time) until the scale fits. Ground truth: the steps whose scale fell."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    amp = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    extra = {"scaler": amp} if scaler_given else {}
    g = torch.Generator().manual_seed(0)
    truth = []
    with gradscope.watch(model, optimizer=opt, **extra) as scope:  # default schedule
        for i in range(steps):
            x = torch.randn(32, 16, generator=g)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = (model(x).float() - 1).pow(2).mean()
            opt.zero_grad()
            before = amp.get_scale()
            amp.scale(loss).backward()
            amp.step(opt)
            amp.update()
            if amp.get_scale() < before:
                truth.append(i)
            scope.step(loss)
        report = scope.report()
    return scope, report, truth


@pytest.mark.parametrize("scaler_given", [False, True], ids=["no-scaler-argument", "scaler-argument"])
def test_steps_a_grad_scaler_skips_are_recognised_without_being_told(scaler_given):
    scope, report, truth = _fp16_run(scaler_given)
    assert len(truth) > 10  # more than ten start-up overflows in a row
    assert truth == list(range(len(truth)))
    assert scope.history.skipped_steps == truth
    assert scope.history.steps_seen == 40
    nonfinite = [f for f in report.findings if f.kind == "nonfinite"]
    assert nonfinite and all(f.severity == "info" for f in nonfinite)
    assert report.ok


def test_a_discarded_step_is_skipped_whatever_the_loop_order():
    """zero_grad() before the forward, and non-finite gradients thrown away by the loop itself: the step
    is counted, and skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        for i in range(5):
            opt.zero_grad()
            x = torch.randn(4, 4)
            if i == 2:
                x[0, 0] = float("inf")
            loss = model(x).pow(2).mean()
            loss.backward()
            if all(p.grad.isfinite().all() for p in model.parameters()):  # the loop's own overflow check
                opt.step()
    assert scope.history.steps_seen == 5
    assert scope.history.skipped_steps == [2]
    rec = {r.step: r for r in scope.history.records}
    assert rec[2].skipped and rec[2].params["0.weight"].update_norm is None
    assert rec[3].activations["0"].calls == 1  # the next step's forward is its own


def test_finite_gradients_of_an_unwatched_optimizer_do_not_make_skipped_steps():
    """A GAN-like loop: only the discriminator's optimizer is watched; the generator's backward also
    reaches the discriminator's parameters and is cleared without a watched step. No step is skipped."""
    torch.manual_seed(0)
    gen, disc = nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.01)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.01)
    with gradscope.watch(disc, optimizer=opt_d, every=1) as scope:
        for _ in range(4):
            opt_d.zero_grad()
            disc(gen(torch.randn(8, 3)).detach()).mean().backward()
            opt_d.step()
            opt_g.zero_grad()
            opt_d.zero_grad()
            (-disc(gen(torch.randn(8, 3)))).mean().backward()  # reaches disc's parameters too
            opt_g.step()
    assert scope.history.steps_seen == 4
    assert scope.history.skipped_total == 0
