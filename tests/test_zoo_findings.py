"""End to end: real seeded training runs from the zoo (tests/zoo.py, built on gradscope.demo), watched by gradscope.

Each broken model must be caught as the right kind at the right layer, and each test also checks the
physical fact with plain torch (the gradient really vanished, the units really are dead), so a finding
can never pass on mocked numbers. Healthy controls must raise no warning or critical finding at all.
"""

from __future__ import annotations

import math
from statistics import median

import pytest
import torch
import zoo

import gradscope
from gradscope.findings import Report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def watched(sc: zoo.Scenario, every: int | None = 1, after_backward=None) -> tuple[Report, list[float]]:
    kwargs: dict = {} if every is None else {"every": every}
    if sc.scaler is not None:
        kwargs["scaler"] = sc.scaler  # so gradscope knows which steps the scaler skipped
    with gradscope.watch(sc.model, sc.optimizer, **kwargs) as scope:
        losses = sc.run(scope, after_backward=after_backward)
        report = scope.report()
    return report, losses


def the(report: Report, kind: str, layer: str) -> gradscope.Finding:
    hits = [f for f in report.findings if f.kind == kind and f.layer == layer]
    assert hits, f"no {kind} at {layer!r}; got {[(f.kind, f.layer, f.severity) for f in report.findings]}"
    return hits[0]


# --- healthy controls --------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, None], ids=["every=1", "default-every"])
@pytest.mark.parametrize("name", list(zoo.HEALTHY))
def test_healthy_controls_are_silent(name: str, every: int | None):
    sc = zoo.build(name)
    report, losses = watched(sc, every)
    loud = [(f.kind, f.layer, f.severity, f.message) for f in report.findings if f.severity != "info"]
    assert loud == []
    assert report.ok and report.steps == sc.steps
    # The control is healthy by its own measure too: it trains.
    assert all(math.isfinite(v) for v in losses)
    assert median(losses[-10:]) < 0.8 * median(losses[:10])


def test_grad_scaler_calibration_is_only_info():
    sc = zoo.healthy_mlp_fp16_scaler()
    report, _ = watched(sc)
    # Physically: the scaler started at 2**24 and skipped its first steps on overflowing fp16 gradients.
    assert sc.scaler.get_scale() < 2.0**24
    (f,) = [f for f in report.findings if f.kind == "nonfinite"]
    assert f.severity == "info" and f.step == 0 and f.evidence["overflow"] == "skipped"
    assert f.evidence["skipped_steps"] == math.log2(2.0**24 / sc.scaler.get_scale())  # one halving per skip


def test_raising_the_lr_is_what_explodes():
    # The exploding scenario's own control: the same run without the lr raise is silent.
    report, _ = watched(zoo.exploding_lr(at=None))
    assert [f for f in report.findings if f.severity != "info"] == []


# --- broken models -----------------------------------------------------------------------------------


def test_vanishing_sigmoid_caught_at_the_earliest_layers():
    sc = zoo.vanishing_sigmoid()
    ratios: list[float] = []

    def measure(step: int) -> None:
        ratios.append(float(sc.model.fc0.weight.grad.norm() / sc.model.head.weight.grad.norm()))

    report, _ = watched(sc, after_backward=measure)
    assert max(ratios) < 1e-6  # physically: the first layer's gradient is < 1e-6 of the last's, always
    f = the(report, "vanishing_gradient", "fc0")
    assert f.severity == "critical" and f.step == 0
    vanishing = [g.layer for g in report.findings if g.kind == "vanishing_gradient"]
    depth = {name: i for i, name in enumerate(n for n, _ in sc.model.named_children())}
    # Every affected layer named, earliest first within a severity; the last layers are not affected.
    assert vanishing[0] == "fc0" and {"fc1", "fc2", "fc3"} <= set(vanishing)
    assert not {"fc11", "head"} & set(vanishing)
    crit = [n for n in vanishing if the(report, "vanishing_gradient", n).severity == "critical"]
    assert crit == sorted(crit, key=depth.__getitem__)


def test_dead_relu_caught_at_the_activation_module():
    sc = zoo.dead_relu()
    report, _ = watched(sc)
    f = the(report, "dead_relu", "act2")
    assert f.severity == "critical" and f.evidence["dead_fraction"] == 1.0 and f.step == 0
    assert [g.layer for g in report.findings if g.kind == "dead_relu"] == ["act2"]  # act1 is alive
    # Physically: act2 outputs exactly zero for every sample of the whole dataset.
    outs: list[torch.Tensor] = []
    handle = sc.model.act2.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    with torch.no_grad():
        sc.model(sc.data.x)
    handle.remove()
    assert outs[0].shape == (sc.data.x.shape[0], 64) and bool((outs[0] == 0).all())


def test_exploding_gradient_dated_from_the_lr_raise():
    sc = zoo.exploding_lr(at=40)
    norms: list[float] = []
    report, losses = watched(sc, after_backward=lambda s: norms.append(float(sc.model.fc1.weight.grad.norm())))
    before = median(norms[:40])
    assert max(n for n in norms[40:] if math.isfinite(n)) > 1e3 * before  # physically exploded
    assert not math.isfinite(losses[-1])
    f = the(report, "exploding_gradient", "fc1")
    assert f.severity == "critical" and 40 <= f.step <= 43
    assert all(g.step >= 40 for g in report.findings if g.kind == "exploding_gradient")
    assert f.evidence["baseline_grad_norm"] == pytest.approx(before, rel=0.5)


def test_batchnorm_eval_shift_caught_at_the_norm_layer():
    sc = zoo.bn_eval_shift()
    report, _ = watched(sc)
    f = the(report, "normalization_drift", "bn0")
    assert f.evidence["mode"] == "eval" and f.severity in ("warning", "critical")
    # Physically: the eval batch sits many running standard deviations away from the running mean.
    bn = sc.model.bn0
    x = sc.eval_data.batch(0)[0]
    gap = ((x.mean(0) - bn.running_mean).abs() / (bn.running_var + bn.eps).sqrt()).mean()
    assert float(gap) > 3.0
    assert float(gap) == pytest.approx(f.evidence["mean_gap"], rel=0.25)


def test_nan_caught_where_it_first_appears():
    sc = zoo.nan_source(at=25)
    report, _ = watched(sc)
    nonfinite = [f for f in report.findings if f.kind == "nonfinite"]
    assert [(f.layer, f.step, f.severity) for f in nonfinite] == [("exp", 25, "critical")]
    # Physically, in a plain replay: the first module in forward order with a non-finite output.
    replay = zoo.nan_source(at=25)
    first: list[tuple[int, str]] = []
    step = [0]
    for name, module in replay.model.named_children():
        module.register_forward_hook(
            lambda m, i, o, name=name: first.append((step[0], name)) if not torch.isfinite(o).all() else None
        )

    def tick(s: int) -> None:
        step[0] = s + 1

    replay.run(after_backward=tick)
    assert first[0] == (25, "exp")


def test_layer_left_out_of_the_optimizer():
    sc = zoo.not_in_optimizer()
    before = sc.model.fc2.weight.detach().clone()
    grads: list[float] = []
    report, _ = watched(sc, after_backward=lambda s: grads.append(float(sc.model.fc2.weight.grad.norm())))
    assert torch.equal(sc.model.fc2.weight, before) and min(grads) > 0  # gets gradients, never moves
    f = the(report, "not_in_optimizer", "fc2")
    assert f.severity == "critical"
    assert [g.layer for g in report.findings if g.kind == "not_in_optimizer"] == ["fc2"]


def test_unused_parameter_but_not_the_frozen_one():
    sc = zoo.unused_parameter()
    report, _ = watched(sc)
    assert sc.model.aux.weight.grad is None and sc.model.aux.weight.requires_grad
    assert not sc.model.stem.weight.requires_grad and sc.model.stem.weight.grad is None
    the(report, "unused_parameter", "aux")
    assert [f.layer for f in report.findings if f.kind == "unused_parameter"] == ["aux"]


def test_saturated_tanh_caught_at_the_activation():
    sc = zoo.saturated_tanh()
    report, _ = watched(sc)
    f = the(report, "saturated_activation", "act1")
    with torch.no_grad():
        out = sc.model.act1(sc.model.fc1(sc.data.x))
    share = float((out.abs() >= 0.9747).float().mean())  # the tanh band where 1 - y^2 < 0.05
    assert share > 0.9
    assert f.severity == "critical" and f.evidence["saturated_fraction"] == pytest.approx(share, abs=0.05)
