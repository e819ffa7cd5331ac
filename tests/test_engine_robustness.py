"""The engine works on awkward models and never changes training: every case the foundation issue names."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

import gradscope
from gradscope.errors import AlreadyWatchedError, UsageError

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _hook_snapshot(model: nn.Module, opts: list[torch.optim.Optimizer]) -> dict:
    snap = {}
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            snap[(name, attr)] = dict(getattr(m, attr, {}))
    for name, p in model.named_parameters():
        snap[(name, "param_backward")] = dict(p._backward_hooks or {})
        snap[(name, "param_post_acc")] = dict(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    for i, opt in enumerate(opts):
        snap[(i, "pre")] = dict(opt._optimizer_step_pre_hooks)
        snap[(i, "post")] = dict(opt._optimizer_step_post_hooks)
    return snap


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def _run(seed: int, watched: bool, every: int = 1, steps: int = 6):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(32, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scope = gradscope.watch(model, optimizer=opt, every=every) if watched else None
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scope:
            scope.step(loss)
        losses.append(loss.detach().clone())
    if scope:
        scope.report()
        scope.close()
    return losses, model.state_dict(), torch.get_rng_state()


def test_training_is_bit_identical_with_and_without_a_scope():
    plain_losses, plain_state, plain_rng = _run(3, watched=False)
    seen_losses, seen_state, seen_rng = _run(3, watched=True)
    for a, b in zip(plain_losses, seen_losses, strict=True):
        assert torch.equal(a, b)
    assert plain_state.keys() == seen_state.keys()
    for k in plain_state:
        assert torch.equal(plain_state[k], seen_state[k]), k
    # no random numbers were drawn by gradscope (dropout uses the same stream in both runs)
    assert torch.equal(plain_rng, seen_rng)


def test_close_leaves_the_model_exactly_as_it_was():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_snapshot(model, [opt])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scope = gradscope.watch(model, optimizer=opt, every=1)
    assert _hook_snapshot(model, [opt]) != before
    out = model(torch.randn(4, 8))  # a forward whose backward never runs: its tensor hooks must go too
    scope.close()
    scope.close()  # idempotent
    assert _hook_snapshot(model, [opt]) == before
    out.sum().backward()  # a leftover tensor hook would fire here
    assert scope.history.records == scope.history.records.__class__(maxlen=scope.history.capacity)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_context_manager_closes_on_exceptions():
    model = _mlp()
    before = _hook_snapshot(model, [])
    with pytest.raises(RuntimeError, match="boom"), gradscope.watch(model, every=1):
        model(torch.randn(2, 8))
        raise RuntimeError("boom")
    assert _hook_snapshot(model, []) == before
    gradscope.watch(model).close()  # no longer counted as watched


def test_watching_a_watched_model_is_a_clear_error():
    model = _mlp()
    with gradscope.watch(model):
        with pytest.raises(AlreadyWatchedError, match="already watched"):
            gradscope.watch(model)
        with pytest.raises(AlreadyWatchedError):
            gradscope.watch(model[2])  # a submodule of a watched model
    gradscope.watch(model).close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every must be an int >= 1"),
        ({"every": 2.5}, "every must be an int >= 1"),
        ({"optimizer": "adam"}, "optimizer must be a torch.optim.Optimizer"),
        ({"thresholds": {"dead_warning": 0.3}}, "gradscope.Thresholds"),
    ],
)
def test_bad_arguments_say_what_to_do(kwargs, match):
    with pytest.raises(UsageError, match=match):
        gradscope.watch(_mlp(), **kwargs)
    with pytest.raises(UsageError, match=r"needs a torch\.nn\.Module"):
        gradscope.watch("model")


def test_no_activation_or_gradient_outlives_its_hook():
    model = _mlp()
    refs = []

    def keep_ref(module, inputs, output):
        refs.append(weakref.ref(output))

    model[2].register_forward_hook(keep_ref)
    with gradscope.watch(model, every=1, histograms=True) as scope:
        out = model(torch.randn(4, 8))
        out.sum().backward()
        del out
        gc.collect()
        assert refs and all(r() is None for r in refs)
        scope.step()
    gc.collect()
    assert all(r() is None for r in refs)


def test_tuple_dict_and_dataclass_outputs():
    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        aux: float

    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return {"pair": (self.a(x), torch.ones(2, dtype=torch.long)), "out": Out(self.b(x), 1.0)}

    model = Multi()
    with gradscope.watch(model, every=1) as scope:
        res = model(torch.randn(5, 4))
        (res["pair"][0].sum() + res["out"].logits.sum()).backward()
        scope.step()
    rec = scope.history.last
    assert rec.activations[""].numel == 5 * 3 + 5 * 2  # both float outputs, the long tensor skipped
    assert rec.gradients[""].norm > 0
    assert {"a", "b"} <= rec.gradients.keys()


def test_shared_module_called_several_times():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(6, 6), nn.ReLU())

        def forward(self, x):
            for _ in range(3):
                x = self.block(x)
            return x

    model = Shared()
    with gradscope.watch(model, every=1) as scope:
        model(torch.randn(2, 6)).sum().backward()
        scope.step()
    act = scope.history.last.activations["block.0"]
    assert act.calls == 3 and act.numel == 3 * 12


def test_inplace_ops_after_hooked_modules():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.fc(x)
            h.mul_(2.0)  # an in-place op on the hooked module's output
            return self.act(h)

    model = InPlace()
    x = torch.randn(8, 5)
    with gradscope.watch(model, every=1) as scope:
        out = model(x)
        out.sum().backward()
        scope.step()
    rec = scope.history.last
    with torch.no_grad():
        pre = model.fc(x)
    # fc's statistics are of its own output, measured before the in-place ops changed it
    assert rec.activations["fc"].mean == pytest.approx(pre.mean().item(), rel=1e-5)
    # d(sum(relu(2h)))/dh = 2 * [h > 0]
    expected = (2.0 * (pre > 0).float()).norm().item()
    assert rec.gradients["fc"].norm == pytest.approx(expected, rel=1e-5)
    assert rec.activations["act"].zero_frac == pytest.approx((pre <= 0).float().mean().item())


def test_parameterless_modules_and_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.Flatten(), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
    rec = scope.history.last
    assert "0.weight" not in rec.params  # frozen: not measured as trainable
    assert scope.history.params["0.weight"].requires_grad is False
    assert {"1", "3"} <= rec.activations.keys()
    assert rec.params["2.weight"].update_norm > 0


def test_gradient_accumulation_measures_the_accumulated_step():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        opt.zero_grad()
        for _ in range(4):
            model(torch.randn(2, 4)).sum().backward()
        grads = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        opt.step()
    rec = scope.history.last
    assert scope.history.steps_seen == 1
    assert rec.activations["0"].calls == 4
    for n, g in grads.items():
        assert rec.params[n].grad_norm == pytest.approx(g, rel=1e-5)


def test_evaluation_forwards_are_observed_but_not_steps():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 4)).sum().backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            model(torch.randn(16, 4) * 50 + 10)
        with torch.inference_mode():
            model(torch.randn(16, 4) * 50 + 10)
        model.train()
        scope.report()
    assert scope.history.steps_seen == 3
    assert len(scope.history.records) == 3
    rec = scope.history.last
    assert rec.activations["2"].calls == 1  # the eval forwards did not join the training statistics
    ev = rec.eval_norms["1"]
    assert not ev.training and ev.calls == 2
    assert ev.mean_gap_max > 10  # inputs shifted far from the running statistics


def test_bf16_autocast_statistics_are_fp32():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rec = scope.history.last
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
    assert isinstance(rec.activations["0"].mean, float)
    assert rec.activations["0"].rms == pytest.approx(h.float().pow(2).mean().sqrt().item(), rel=1e-2)
    assert all(p.grad_norm is not None and p.grad_norm > 0 for p in rec.params.values())


def test_several_optimizers_make_one_step():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = torch.optim.Adam(model[2].parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=[opt_a, opt_b], every=1) as scope:
        for _ in range(3):
            opt_a.zero_grad()
            opt_b.zero_grad()
            model(torch.randn(4, 4)).sum().backward()
            opt_a.step()
            opt_b.step()
            scope.step(1.0)
    assert scope.history.steps_seen == 3
    rec = scope.history.last
    assert all(p.update_norm is not None and p.update_norm > 0 for p in rec.params.values())
    assert all(info.in_optimizer for info in scope.history.params.values())
    assert rec.lrs == [0.1, 0.01]


def test_tied_weights_are_reported_once():
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(6, 6), head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        opt.zero_grad()
        model(torch.randint(0, 10, (3, 5))).sum().backward()
        opt.step()
    assert "0.weight" in scope.history.params and "2.weight" not in scope.history.params
    assert scope.history.last.params["0.weight"].grad_norm > 0


def test_a_model_with_hundreds_of_layers():
    layers = []
    for _ in range(200):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 16)).sum().backward()
            opt.step()
        report = scope.report()
    assert len(scope.history.last.activations) == 400
    assert len(scope.history.last.params) == 400
    assert len(report.layers) == 400


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.LBFGS(ps, lr=0.5), lambda ps: torch.optim.SGD(ps, lr=0.1)])
def test_step_with_a_closure_reads_the_gradients_it_computes(make_opt):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = make_opt(model.parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    seen = {}

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        if not seen:  # the gradients of the first call, before any parameter moved
            seen.update({n: p.grad.norm().item() for n, p in model.named_parameters()})
            seen["_w"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return loss

    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        opt.step(closure)
    rec = scope.history.last
    assert scope.history.steps_seen == 1
    for n, p in model.named_parameters():
        assert rec.params[n].grad_norm == pytest.approx(seen[n], rel=1e-5)
        assert rec.params[n].update_norm == pytest.approx((p.detach() - seen["_w"][n]).norm().item(), rel=1e-4)


def test_a_collected_step_without_any_gradient_does_not_break_training():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        opt.step()  # nothing has a gradient yet
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    assert scope.history.steps_seen == 2
    assert scope.history.records[0].params["weight"].grad_norm is None
    assert scope.last_report is not None and scope.last_report.steps == 2


def test_pending_losses_keep_no_large_storage_alive():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, every=1000) as scope:
        for _ in range(20):
            loss = nn.functional.mse_loss(model(torch.randn(128, 64)), torch.randn(128, 64))
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss)
        pending = [v for _, v in scope._losses]
        assert len(pending) == 20
        # each loss waits for the next collected step as its own few bytes, not its producer's buffer
        assert all(v.untyped_storage().nbytes() <= 8 for v in pending)
