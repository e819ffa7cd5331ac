"""Broken twins of real architectures, at gradscope's default settings: each really has its problem (the
ground truth is measured in plain torch inside the test, never read from gradscope), and gradscope names it
at the right layer and step, root cause first. The healthy twins are in test_real_architectures.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from real_models import VOCAB, Run, at_least_warning, loud, train_cnn, train_gpt, train_hf
from torch import nn
from torch.nn import functional as F

import gradscope
from gradscope.findings import Report

UPDATE, LOSS, VANISH, EXPLODE = "update_ratio", "loss_divergence", "vanishing_gradient", "exploding_gradient"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def relative_update(layer: nn.Linear, before: torch.Tensor) -> float:
    return float((layer.weight.detach() - before).norm() / before.norm())


def kinds_loud(report: Report, kind: str) -> list[str]:
    return [f.layer for f in report.findings if f.kind == kind and f.severity != "info"]


# --- learning-rate ruin ----------------------------------------------------------------------------------


def test_nanogpt_lr_100x_without_warmup_is_an_update_ratio_finding_at_step_0():
    before: dict[str, torch.Tensor] = {}

    def keep(step, model, run):
        if step == 0:
            before["w"] = model.h[0].attn.c_attn.weight.detach().clone()

    def measure(step, model, run):
        if step == 0:
            run.measured["ratio0"] = [relative_update(model.h[0].attn.c_attn, before["w"])]

    run = train_gpt(steps=60, lr=0.1, after_backward=keep, after_step=measure)
    # Ground truth: Adam's first step moves each weight by about lr = 0.1 against weights of std 0.02, so
    # the step is several times the weights themselves (healthy is ~1e-3); the loss rises off ln(65).
    assert run.measured["ratio0"][0] > 1.0
    assert max(run.losses[:10]) > run.losses[0] + 0.5
    found = at_least_warning(run.report, UPDATE, LOSS)
    assert found, run.report.findings
    ratio = [f for f in found if f.kind == UPDATE and f.layer == "h.0.attn.c_attn"]
    assert ratio and ratio[0].step == 0
    assert ratio[0].evidence["update_ratio"] == pytest.approx(run.measured["ratio0"][0], rel=0.05)
    assert kinds_loud(run.report, VANISH) == []  # the lr's ruin is not "vanishing" anywhere


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hugging_face_lr_1_is_caught_as_the_learning_rate_not_vanishing(name):
    pytest.importorskip("transformers")
    run = train_hf(name, steps=40, lr=1.0)
    # Ground truth: the loss blows up several-fold within the first steps (GPT-2: 4.6 -> 38 at step 1).
    assert max(run.losses[1:6]) > 2.5 * run.losses[0]
    found = at_least_warning(run.report, UPDATE, LOSS)
    assert any(f.step == 0 for f in found if f.kind == UPDATE)
    assert any(f.kind == LOSS and f.severity == "critical" for f in found) or name == "llama"
    assert kinds_loud(run.report, VANISH) == []
    assert run.report.findings[0].kind in (UPDATE, LOSS)  # the root leads


def test_cnn_sgd_at_100x_its_learning_rate_ends_at_chance_and_is_caught():
    run, accuracy = train_cnn(lr=5.0, steps=80)
    assert accuracy < 0.25  # ground truth: chance is 0.1, the healthy twin reaches > 0.8
    found = at_least_warning(run.report, UPDATE, LOSS)
    assert found, run.report.findings


# --- scale at initialization ----------------------------------------------------------------------------


def test_nanogpt_init_std_1_is_init_scale_at_the_output_layer():
    def logits_rms(step, model, run):
        if step == 0:
            with torch.no_grad():
                idx = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
                run.measured["rms"] = [float(model.logits(idx).pow(2).mean().sqrt())]

    run = train_gpt(steps=30, std=1.0, after_backward=logits_rms)
    # Ground truth: the first loss is far above ln(65) = 4.17, an uninformed guess, and the logits are large.
    assert run.losses[0] > 3 * math.log(VOCAB)
    assert run.measured["rms"][0] > 5
    found = [f for f in run.report.findings if f.kind == "init_scale"]
    assert [(f.layer, f.step, f.severity) for f in found] == [("lm_head", 0, "warning")]
    assert found[0].evidence["loss_first"] == pytest.approx(run.losses[0])
    assert found[0].evidence["outputs"] == VOCAB


def test_a_healthy_init_is_not_init_scale():
    run = train_gpt(steps=20)
    assert not [f for f in run.report.findings if f.kind == "init_scale"]


# --- gradients never zeroed --------------------------------------------------------------------------


def test_nanogpt_without_zero_grad_is_exploding_gradient_or_divergence():
    def grad_norm(step, model, run):
        run.measured.setdefault("g", []).append(float(model.h[0].attn.c_attn.weight.grad.norm()))

    run = train_gpt(steps=200, lr=3e-3, warmup=20, zero_grad=False, after_backward=grad_norm)
    g = run.measured["g"]
    # Ground truth: the summed gradient grows steadily, and the loss ends above where the healthy twin
    # (test_real_architectures.py, same lr and length) goes: it does not learn.
    assert g[-1] > 10 * g[0]
    assert sum(run.losses[-20:]) / 20 > run.losses[0] - 0.2
    found = at_least_warning(run.report, EXPLODE, LOSS)
    assert found, run.report.findings
    assert any(f.kind == EXPLODE and f.evidence.get("pattern") == "steady" for f in found)
    assert "zero_grad" in found[0].hint


# --- NaN first ----------------------------------------------------------------------------------------------


def test_fully_masked_softmax_row_leads_with_nonfinite_and_is_never_vanishing():
    probe: dict[str, bool] = {}

    def check(step, model, run):
        if step == 0:  # plain torch: the attention probabilities of the first query are NaN
            att = torch.full((1, 1), float("-inf")).softmax(-1)
            probe["nan"] = bool(torch.isnan(att).all())

    run = train_gpt(steps=30, mask_bug=True, after_backward=check)
    assert probe["nan"] and math.isnan(run.losses[0])
    first = run.report.findings[0]
    assert first.kind == "nonfinite" and first.severity == "critical" and first.step == 0
    assert first.layer.startswith("h.0.attn")
    # NaN is never "small": no vanishing gradient, dead unit or tiny update is claimed anywhere.
    for kind in (VANISH, "dead_relu"):
        assert [f for f in run.report.findings if f.kind == kind] == []
    assert not [f for f in run.report.findings if f.kind == UPDATE and "update_ratio_at_peak_lr" in f.evidence]
    div = [f for f in run.report.findings if f.kind == LOSS]
    assert div and "learning rate" not in div[0].hint.lower()


# --- vanishing in a deep plain net ------------------------------------------------------------------------


def test_deep_plain_relu_net_with_xavier_init_under_sgd_is_vanishing_at_the_early_layers():
    torch.manual_seed(0)
    d, depth = 64, 30
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(d, d)
        nn.init.xavier_normal_(lin.weight)  # He et al. (2015), sec. 2.2: the signal halves in power per layer
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(d, 10))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2048, d, generator=g), torch.randn(d, 10, generator=g)
    y = (x @ w).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses, rel0 = [], []
    with gradscope.watch(model, opt) as scope:
        for _ in range(150):
            ix = torch.randint(0, len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[ix]), y[ix])
            opt.zero_grad()
            loss.backward()
            rel0.append(float(model[0].weight.grad.norm() / model[0].weight.detach().norm()))
            opt.step()
            losses.append(loss.item())
            scope.step(loss=losses[-1])
        report = scope.report()
    # Ground truth: the first layer's gradient is ~1e-6 of its weights and the loss stays at chance, ln(10).
    assert max(rel0) < 1e-5
    assert abs(sum(losses[-20:]) / 20 - math.log(10)) < 0.05
    vanishing = kinds_loud(report, VANISH)
    assert "0" in vanishing and "2" in vanishing
    first = next(f for f in report.findings if f.kind == VANISH and f.layer == "0")
    assert first.step == 0
    assert first.evidence["grad_to_weight"] == pytest.approx(sorted(rel0[::10])[len(rel0[::10]) // 2], rel=0.5)
    # Its tiny updates follow from the tiny gradient: folded into the vanishing finding, not beside it.
    assert not [f for f in report.findings if f.kind == UPDATE and f.layer == "0"]


# --- explosions ---------------------------------------------------------------------------------------------


def test_an_explosion_adam_hides_is_exploding_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 64), act1=nn.Tanh(), fc2=nn.Linear(64, 64),
                                      act2=nn.Tanh(), head=nn.Linear(64, 4)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses, ratio = [], []
    with gradscope.watch(model, opt) as scope:
        for _ in range(100):
            x = torch.randn(32, 16, generator=g)
            y = 1e4 * (x[:, :4] + 1)  # targets in the tens of thousands: an enormous start
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            ratio.append(float(model.head.weight.grad.norm() / model.head.weight.detach().norm()))
            opt.step()
            losses.append(loss.item())
            scope.step(loss=losses[-1])
        report = scope.report()
    # Ground truth: the head's gradient is 1e3-1e5 times its weights, yet Adam's steps stay lr-sized and
    # the loss does not blow up: nothing but the gradient shows the problem.
    assert min(ratio) > 1e3
    assert losses[-1] < 1.1 * losses[0]
    assert "head" in kinds_loud(report, EXPLODE)


def test_a_recurrent_net_exploding_through_time():
    torch.manual_seed(0)
    rnn, head = nn.RNN(8, 32, batch_first=True), nn.Linear(32, 1)
    with torch.no_grad():  # recurrent weights with every singular value 3: gradients grow 3x per time step
        rnn.weight_hh_l0.copy_(3.0 * torch.linalg.qr(torch.randn(32, 32))[0])
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    ratio = []
    with gradscope.watch(model, opt) as scope:
        for _ in range(40):
            x = torch.randn(16, 40, 8, generator=g)
            out, _ = rnn(x)
            loss = F.mse_loss(head(out[:, -1]), x[:, :5, 0].sum(1, keepdim=True))
            opt.zero_grad()
            loss.backward()
            ratio.append(float(rnn.weight_hh_l0.grad.norm() / rnn.weight_hh_l0.detach().norm()))
            opt.step()
            scope.step(loss=loss.item())
        report = scope.report()
    assert ratio[0] > 1e3  # ground truth: through 40 time steps the gradient dwarfs the weights
    found = [f for f in report.findings if f.kind == EXPLODE and f.layer == "rnn"]
    assert found and found[0].severity != "info" and found[0].step == 0


# --- normalization ------------------------------------------------------------------------------------------


def test_layernorm_gain_collapsing_under_weight_decay():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(16, 32), ln=nn.LayerNorm(32), act=nn.GELU(), head=nn.Linear(32, 4)))
    # The classic slip: weight decay on every parameter, the norm gains included, and a strong one.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=20.0)
    g = torch.Generator().manual_seed(1)
    gains = []
    with gradscope.watch(model, opt) as scope:
        for _ in range(150):
            x = torch.randn(32, 16, generator=g)
            loss = F.mse_loss(model(x), x[:, :4])
            opt.zero_grad()
            loss.backward()
            opt.step()
            gains.append(float(model.ln.weight.detach().pow(2).mean().sqrt()))
            scope.step(loss=loss.item())
        report = scope.report()
    assert gains[-1] < 0.1 * 1.0  # ground truth: the gain started at 1 and decayed below a tenth of it
    found = [f for f in report.findings if f.kind == "normalization_drift" and f.layer == "ln"]
    assert found and found[0].severity == "warning" and "collapsed" in found[0].message
    assert found[0].evidence["gain_rms"] == pytest.approx(gains[-1], rel=0.2)


def test_batchnorm_with_slow_momentum_lagging_a_shift_in_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 16), bn=nn.BatchNorm1d(16, momentum=0.001),
                                      act=nn.ReLU(), head=nn.Linear(16, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    gaps = []
    with gradscope.watch(model, opt) as scope:
        for step in range(200):
            x = torch.randn(64, 8, generator=g) + (10.0 if step >= 60 else 0.0)  # the input shifts at step 60
            with torch.no_grad():
                h = model.fc(x)
                gap = (h.mean(0) - model.bn.running_mean).abs() / (model.bn.running_var + 1e-5).sqrt()
                gaps.append(float(gap.mean()))
            loss = F.cross_entropy(model(x), (x[:, 0] > x[:, 1]).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss=loss.item())
        report = scope.report()
    assert min(gaps[80:]) > 3.0 > max(gaps[40:60])  # ground truth: the running mean lags the shift
    found = [f for f in report.findings if f.kind == "normalization_drift" and f.layer == "bn"]
    assert found and found[0].evidence["mode"] == "train"
    assert 60 <= found[0].step <= 80


# --- dead units -----------------------------------------------------------------------------------------------


def _dead_run(model: nn.Module, steps: int = 40) -> tuple[Report, torch.Tensor]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with gradscope.watch(model, opt) as scope:
        for _ in range(steps):
            x = torch.randn(32, 16, generator=g)
            loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss=loss.item())
        report = scope.report()
    return report, torch.randn(512, 16, generator=g)


def test_activations_alive_when_zero_are_never_dead_relu():
    torch.manual_seed(0)
    acts = OrderedDict(hardshrink=nn.Hardshrink(5.0), softshrink=nn.Softshrink(5.0),
                       threshold=nn.Threshold(5.0, 0.0), leaky=nn.LeakyReLU(0.0))
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (name, act) in enumerate(acts.items()):
        modules[f"fc{i}"] = nn.Linear(16, 16)
        modules[name] = act
    modules["head"] = nn.Linear(16, 2)
    model = nn.Sequential(modules)
    report, x = _dead_run(model, steps=60)
    with torch.no_grad():  # ground truth: these outputs are (nearly) all exactly zero
        zero = float((model[:2](x) == 0).float().mean())
    assert zero > 0.9
    assert [f for f in report.findings if f.kind == "dead_relu"] == []


class FunctionalRelu(nn.Module):
    """A block whose rectifier is ``F.relu`` in forward(): no module of its own to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 2)
        with torch.no_grad():
            self.fc1.bias[:24] = -20.0  # 24 of 32 units can never fire for standard-normal inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def test_dead_units_behind_a_functional_relu_are_found_at_the_producing_layer():
    torch.manual_seed(0)
    model = FunctionalRelu()
    report, x = _dead_run(model)
    with torch.no_grad():  # ground truth: 24 units' pre-activations are never positive
        dead = int(((model.fc1(x) > 0).sum(0) == 0).sum())
    assert dead == 24
    found = [f for f in report.findings if f.kind == "dead_relu"]
    assert [(f.layer, f.severity) for f in found] == [("fc1", "warning")]
    assert found[0].evidence["dead_units"] == 24 and found[0].evidence["units"] == 32


class SharedRelu(nn.Module):
    """One ``nn.ReLU`` instance applied at two widths (16 and 32), as ResNet blocks reuse ``self.relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 32)
        self.head = nn.Linear(32, 2)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.fc2.bias.fill_(-20.0)  # every unit at width 32 is dead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_a_relu_reused_at_two_widths_keeps_both_masks_and_finds_the_dead_width():
    torch.manual_seed(0)
    model = SharedRelu()
    report, x = _dead_run(model)
    with torch.no_grad():
        h1 = model.relu(model.fc1(x))
        assert int(((model.fc2(h1) > 0).sum(0) == 0).sum()) == 32  # ground truth: all dead at width 32
        assert int(((h1 > 0).sum(0) == 0).sum()) < 8  # and alive at width 16
    found = [f for f in report.findings if f.kind == "dead_relu"]
    assert found and found[0].severity == "critical"
    assert found[0].layer in ("relu", "fc2")
    assert [f for f in report.findings if f.kind == VANISH and f.severity != "info"] == []


def test_loud_helper_on_an_empty_report():
    assert loud(Run(Report(), []).report) == []
