"""Graded evidence, root causes first, and the loss read one way: each rule over hand-built histories.

Expected values are the arithmetic that produces them. The same classes on real training runs are in
test_real_pathologies.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradscope.analyzers import (
    activations,
    analyze,
    gradients,
    initialization,
    loss,
    normalization,
    optimizer,
)
from gradscope.analyzers.parameters import verb
from gradscope.checkpoint import rules
from gradscope.checkpoint.weights import tensor_stats
from gradscope.config import Thresholds
from gradscope.findings import Finding, sort_findings
from gradscope.stats.history import History
from gradscope.stats.records import (
    ActivationStats,
    GradStats,
    LayerInfo,
    NormStats,
    ParamInfo,
    ParamStats,
    StepRecord,
)

TH = Thresholds()


def history(roles: dict[str, str], shapes: dict[str, tuple[int, ...]] | None = None, optimizer_: bool = True) -> History:
    """Layers in forward order; each weighted one ('linear', 'recurrent', 'embedding') owns a weight."""
    layers, params = {}, {}
    for order, (name, role) in enumerate(roles.items()):
        info = LayerInfo(name=name, type={"relu": "ReLU", "norm": "LayerNorm"}.get(role, "Linear"), role=role,
                         order=order)
        if role in ("linear", "recurrent", "embedding"):
            shape = (shapes or {}).get(name, (4, 4))
            full = f"{name}.weight"
            info.params.append(full)
            params[full] = ParamInfo(name=full, layer=name, shape=shape, numel=math.prod(shape), dtype="float32",
                                     in_optimizer=True if optimizer_ else None)
        layers[name] = info
    return History(layers=layers, params=params, has_optimizer=optimizer_)


def step(t: int, grads: dict[str, float], *, weight: float = 1.0, loss_: float | None = None,
         update: dict[str, float] | None = None, lr: float = 0.1) -> StepRecord:
    rec = StepRecord(step=t, loss=loss_)
    for layer, g in grads.items():
        rec.params[f"{layer}.weight"] = ParamStats(
            grad_norm=g, weight_norm=weight, grad_nonfinite=not math.isfinite(g),
            update_norm=None if update is None else update[layer] * weight, lr=lr,
        )
    return rec


def kinds(found: list[Finding]) -> list[tuple[str, str, str]]:
    return [(f.kind, f.layer, f.severity) for f in found]


# --- one loss reading ------------------------------------------------------------------------------------


def test_the_loss_baseline_is_where_the_run_began_not_a_median_with_the_blow_up():
    # GPT-2 at lr 1.0: 4.4 at step 0, 42 at step 1, then around 40-77 for the rest of the run.
    pts = [(0, 4.4), (1, 42.0), (2, 50.0)] + [(t, 40.0 + (t % 7) * 5) for t in range(3, 40)]
    assert loss.start_level(pts) == 4.4  # min(4.4, median(4.4, 42, 50) = 42)
    rise = optimizer.find_rise(pts, TH)
    assert rise is not None and rise.severity.value == "critical"
    assert rise.step == 9  # judged from half a window on: (20 + 1) // 2 - 1 = 9


def test_the_run_start_survives_the_ring():
    h = History(capacity=2)  # a ring of 8 losses: the first ones fall out
    for t in range(20):
        h.add_loss(t, 10.0 - t * 0.1)
    pts = loss.loss_points(h)
    assert pts[0] == (0, 10.0) and pts[-1] == (19, pytest.approx(8.1))
    assert [s for s, _ in pts] == sorted({s for s, _ in pts})  # one value per step, in order


def test_trend_stuck_improving_converged():
    h = History()
    for t in range(12):
        h.add_loss(t, 2.0)
    assert loss.trend(h, TH).stuck is True and not loss.trend(h, TH).improving
    g = History()
    for t in range(12):
        g.add_loss(t, 2.0 * 0.5**t)
    assert loss.trend(g, TH).improving and loss.trend(g, TH).converged
    assert loss.trend(History(), TH).stuck is None  # no loss: can't tell
    assert loss.change([(t, v) for t, v in enumerate([3.0, 3.0, 2.0, 2.0, 1.0, 1.0])]) == pytest.approx((3 - 1) / 3)


# --- graded, never dropped -------------------------------------------------------------------------------


def test_a_gate_lowers_to_info_and_says_which():
    h = history({"l0": "linear", "l1": "linear"})
    for t in range(20):
        g = 1.0 if t < 10 else 1e4  # 1e4 x the baseline from step 10 ...
        h.add(step(t, {"l0": g, "l1": 1.0}, weight=1e2, loss_=2.0 - 0.05 * t))  # ... while the loss keeps falling
    found = gradients.analyze(h, TH)
    assert kinds(found) == [("exploding_gradient", "l0", "info")]
    assert "loss kept improving" in str(found[0].evidence["gate"])


def test_a_gradient_1e3_times_its_weights_stands_alone_whatever_the_loss_does():
    h = history({"l0": "linear"})
    for t in range(20):
        h.add(step(t, {"l0": 5e4}, weight=1.0, loss_=1e8 * (1 - 0.01 * t)))  # Adam: the loss still falls
    found = gradients.analyze(h, TH)
    assert kinds(found) == [("exploding_gradient", "l0", "warning")]
    assert found[0].evidence["grad_to_weight"] == pytest.approx(5e4 / 1.0)


def test_a_layer_born_near_zero_is_not_exploding_by_ratio():
    h = history({"l0": "linear"}, shapes={"l0": (4, 4)})
    for t in range(20):
        w = 1e-4 * 4 * (t + 1)  # RMS 1e-4 (t + 1): born near zero, growing 20x
        h.add(step(t, {"l0": 10.0}, weight=w, loss_=2.0 - 0.05 * t))
    assert [f for f in gradients.analyze(h, TH) if f.severity != "info"] == []


def test_nan_is_never_a_small_gradient():
    h = history({"l0": "linear", "l1": "linear"})
    for t in range(12):
        h.add(step(t, {"l0": math.nan, "l1": math.nan}, loss_=math.nan))
    assert [f for f in gradients.analyze(h, TH) if f.kind == "vanishing_gradient"] == []
    assert [f for f in optimizer.analyze(h, TH) if "update_ratio_at_peak_lr" in f.evidence] == []


def test_vanishing_under_a_stuck_loss_with_every_layer_starved():
    h = history({"l0": "linear", "l1": "linear", "l2": "linear"})
    for t in range(15):  # every layer at 1e-6 of its weights (no depth gap), SGD-sized steps, a flat loss
        h.add(step(t, {"l0": 1e-6, "l1": 2e-6, "l2": 4e-6}, loss_=math.log(10),
                       update={"l0": 1e-8, "l1": 2e-8, "l2": 4e-8}))
    found = gradients.analyze(h, TH)
    assert kinds(found) == [(k, n, "warning") for k, n in
                            [("vanishing_gradient", "l0"), ("vanishing_gradient", "l1"), ("vanishing_gradient", "l2")]]
    assert "loss does not improve" in found[0].message


def test_gradients_never_zeroed_grow_steadily_while_the_loss_does_not_improve():
    h = history({"l0": "linear"})
    for t in range(20):
        h.add(step(t * 10, {"l0": 0.1 * (1 + t)}, weight=1.0, loss_=4.2 + 0.01 * t))  # summed: ~linear growth
    for t in range(200):
        h.add_loss(t, 4.2 + 0.001 * t)
    found = gradients.analyze(h, TH)
    assert kinds(found) == [("exploding_gradient", "l0", "critical")]
    assert found[0].evidence["pattern"] == "steady" and "zero_grad" in found[0].hint
    # The late third's median over the first collected step: median(1.5 .. 2.0) / 0.1.
    assert found[0].evidence["growth"] == pytest.approx(0.1 * (17 + 18) / 2 / 0.1)
    # The same growth while the loss falls (a transformer's gradients rising early in healthy training): info.
    ok = history({"l0": "linear"})
    for t in range(20):
        ok.add(step(t * 10, {"l0": 0.1 * (1 + t)}, weight=1.0))
    for t in range(200):
        ok.add_loss(t, 4.2 * 0.99**t)
    assert [f.severity for f in gradients.analyze(ok, TH)] in ([], ["info"])


def test_one_step_as_large_as_the_weights_is_a_warning_unless_born_at_zero():
    h = history({"fc": "linear"})
    for t in range(20):
        h.add(step(t, {"fc": 1.0}, update={"fc": 5.0 if t == 0 else 1e-3}, loss_=4.2 - 0.01 * t))
    found = [f for f in optimizer.analyze(h, TH) if f.kind == "update_ratio"]
    assert kinds(found) == [("update_ratio", "fc", "warning")]
    assert found[0].step == 0 and found[0].evidence["loss"] == "one step"
    z = history({"fc": "linear"})
    z.add(StepRecord(step=0, loss=4.2, params={"fc.weight": ParamStats(grad_norm=1.0, weight_norm=0.0,
                                                                          update_norm=0.1, lr=0.1)}))
    for t in range(1, 20):
        z.add(step(t, {"fc": 1.0}, update={"fc": 1.0 / t}, loss_=4.2 * 0.97**t))
    assert [f for f in optimizer.analyze(z, TH) if f.kind == "update_ratio"] == []


# --- root causes first ------------------------------------------------------------------------------------


def test_findings_after_the_first_nan_fold_into_the_nonfinite_root_which_leads():
    h = history({"l0": "linear", "act": "relu", "l1": "linear"})
    for t in range(20):
        bad = t >= 5
        rec = step(t, {"l0": 1e-9 if not bad else math.nan, "l1": 1e-2}, loss_=1.0 if not bad else math.nan)
        rec.activations["act"] = ActivationStats(numel=64, mean=0, std=0, rms=0, absmax=0, zero_frac=1,
                                                 neg_frac=0, nan=64 if bad else 0, inf=0,
                                                 alive=np.zeros(8, dtype=bool) if bad else np.ones(8, dtype=bool))
        h.add(rec)
    found = analyze(h, TH)
    assert found[0].kind == "nonfinite" and found[0].step == 5
    assert not [f for f in found if f.kind == "dead_relu"]  # NaN steps are not dead units


def test_the_lr_root_takes_the_vanishing_layers_behind_it():
    h = history({"l0": "linear", "l1": "linear"})
    for t in range(20):
        up = {"l0": 50.0 if t == 0 else 1e-9, "l1": 50.0 if t == 0 else 1e-9}
        g = {"l0": 1e-2 if t == 0 else 1e-12, "l1": 1e-2 if t == 0 else 1e-5}
        h.add(step(t, g, update=up, loss_=4.2 if t == 0 else 40.0))
    found = analyze(h, TH)
    assert not [f for f in found if f.kind == "vanishing_gradient"]
    root = found[0]
    assert root.kind == "update_ratio" and root.step == 0
    assert "vanishing_gradient@l0" in str(root.evidence["folded"])
    assert root.severity == "critical"  # at least as severe as what it folded


def test_updates_that_blew_up_after_the_loss_diverged_fold_into_the_divergence():
    h = history({"fc": "linear"})
    for t in range(60):  # the loss climbs from step 10 (bad data); the updates blow up only from step 40
        loss_ = 1.0 if t < 10 else 1.0 + (t - 9)
        h.add(step(t, {"fc": 1.0}, update={"fc": 1e-3 if t < 40 else 0.5}, loss_=loss_))
    found = analyze(h, TH)
    assert [f.kind for f in found] == ["loss_divergence"]
    assert found[0].evidence["folded"] == "update_ratio@fc"


def test_a_fully_dead_layer_takes_the_cut_gradients_before_it():
    h = history({"l0": "linear", "act": "relu", "l1": "linear"})
    for t in range(20):
        rec = step(t, {"l0": 0.0, "l1": 1e-2}, loss_=1.0)
        rec.activations["act"] = ActivationStats(numel=64, mean=0, std=0, rms=0, absmax=0, zero_frac=1,
                                                 neg_frac=0, nan=0, inf=0, alive=np.zeros(8, dtype=bool))
        h.add(rec)
    found = analyze(h, TH)
    assert kinds(found)[0] == ("dead_relu", "act", "critical")
    assert "vanishing_gradient@l0" in str(found[0].evidence["folded"])
    assert not [f for f in found if f.kind == "vanishing_gradient"]


def test_sorting_puts_roots_first_among_equals():
    a = Finding("vanishing_gradient", "critical", "a", 0, "m.", "h.")
    b = Finding("update_ratio", "critical", "b", 0, "m.", "h.", {"folded": "vanishing_gradient@c"})
    n = Finding("nonfinite", "critical", "z", 0, "m.", "h.")
    order = {"a": 0, "b": 1, "z": 2}
    assert [f.layer for f in sort_findings([a, b, n], order)] == ["z", "b", "a"]
    # Roots lead earliest first: a too-large step at step 0 leads the NaN it caused at step 3.
    n.step = 3
    assert [f.layer for f in sort_findings([a, b, n], order)] == ["b", "z", "a"]
    # An explosion that began before the NaN is its cause and leads it; one after it does not.
    e = Finding("exploding_gradient", "critical", "a", 2, "m.", "h.")
    assert [f.kind for f in sort_findings([n, e], order)] == ["exploding_gradient", "nonfinite"]
    e.step = 5
    assert [f.kind for f in sort_findings([n, e], order)] == ["nonfinite", "exploding_gradient"]


# --- init_scale -----------------------------------------------------------------------------------------


def _init_history(first_loss: float, head_rms: float, width: int = 65) -> History:
    h = history({"fc": "linear", "head": "linear"}, shapes={"fc": (32, 16), "head": (width, 32)})
    rec = StepRecord(step=0, loss=first_loss)
    for name, rms in (("fc", 1.0), ("head", head_rms)):
        rec.activations[name] = ActivationStats(numel=640, mean=0, std=rms, rms=rms, absmax=3 * rms, zero_frac=0,
                                                neg_frac=0.5, nan=0, inf=0)
    h.add(rec)
    return h


def test_init_scale_first_loss_far_above_ln_c_with_large_logits():
    found = initialization.analyze(_init_history(36.4, 11.0), TH)
    assert kinds(found) == [("init_scale", "head", "warning")]
    assert found[0].evidence["uninformed_loss"] == pytest.approx(math.log(65))
    assert found[0].evidence["loss_over_uninformed"] == pytest.approx(36.4 / math.log(65))
    # A regression with large targets: a large first loss, small outputs -> nothing.
    assert initialization.analyze(_init_history(36.4, 0.5), TH) == []
    # A healthy start: the loss near ln(65).
    assert initialization.analyze(_init_history(4.2, 1.0), TH) == []


def test_init_scale_activations_growing_layer_over_layer():
    h = history({"a": "linear", "b": "linear", "c": "linear"})
    rec = StepRecord(step=0)
    for name, rms in (("a", 0.1), ("b", 3.0), ("c", 90.0)):
        rec.activations[name] = ActivationStats(numel=64, mean=0, std=rms, rms=rms, absmax=3 * rms, zero_frac=0,
                                                neg_frac=0.5, nan=0, inf=0)
    h.add(rec)
    found = initialization.analyze(h, TH)
    assert kinds(found) == [("init_scale", "c", "warning")]
    assert found[0].evidence["growth"] == pytest.approx(90.0 / 0.1)


# --- dead units wherever the rectifier is -------------------------------------------------------------------


def _weighted_step(t: int, unit_max: np.ndarray, grad_absmax: np.ndarray) -> StepRecord:
    rec = StepRecord(step=t)
    rec.activations["fc"] = ActivationStats(numel=32 * unit_max.size, mean=0, std=1, rms=1, absmax=1, zero_frac=0,
                                            neg_frac=0.5, nan=0, inf=0, unit_max=unit_max)
    rec.gradients["fc"] = GradStats(norm=1.0, absmax=1.0, nan=0, inf=0, order=1, unit_absmax=grad_absmax)
    return rec


def test_dead_units_behind_a_functional_relu_need_no_positive_output_and_zero_gradient():
    h = history({"fc": "linear", "head": "linear"})
    for t in range(10):
        mx = np.array([-1.0] * 6 + [2.0] * 4)  # 6 of 10 pre-activations never positive
        gr = np.array([0.0] * 6 + [0.5] * 4)  # and no gradient comes back through them
        h.add(_weighted_step(t, mx, gr))
    found = activations.analyze(h, TH)
    assert kinds(found) == [("dead_relu", "fc", "warning")]
    assert found[0].evidence["dead_units"] == 6 and found[0].evidence["rectifier"] == "functional"
    # Never positive but gradient flows (a tanh after it, or an identity): alive.
    alive = history({"fc": "linear", "head": "linear"})
    for t in range(10):
        alive.add(_weighted_step(t, np.full(10, -1.0), np.full(10, 0.1)))
    assert activations.analyze(alive, TH) == []


def test_a_relu_module_at_two_widths_is_judged_per_width():
    h = history({"relu": "relu"})
    for t in range(10):
        rec = StepRecord(step=t)
        rec.activations["relu"] = ActivationStats(
            numel=8 * 48, mean=0, std=1, rms=1, absmax=1, zero_frac=0.5, neg_frac=0, nan=0, inf=0, alive=None,
            alive_by_width={16: np.ones(16, dtype=bool), 32: np.zeros(32, dtype=bool)},
        )
        h.add(rec)
    found = activations.analyze(h, TH)
    assert kinds(found) == [("dead_relu", "relu", "critical")]
    assert found[0].evidence["width"] == 32 and found[0].evidence["dead_units"] == 32
    assert found[0].evidence["widths"] == "16, 32"


@pytest.mark.parametrize("kind", ["Hardshrink", "Softshrink", "Threshold", "LeakyReLU"])
def test_zero_band_activations_are_never_dead(kind):
    h = history({"act": "relu"})
    h.layers["act"].type = kind
    for t in range(10):
        h.add(StepRecord(step=t, activations={"act": ActivationStats(
            numel=80, mean=0, std=0, rms=0, absmax=0, zero_frac=1, neg_frac=0, nan=0, inf=0,
            alive=np.zeros(10, dtype=bool))}))
    assert activations.analyze(h, TH) == []


# --- normalization by what it is ----------------------------------------------------------------------------


def _norm(gap: float, gap_max: float, gain: float = 1.0) -> NormStats:
    return NormStats(training=True, input_rms=1.0, mean_gap_max=gap_max, mean_gap_mean=gap, log_var_ratio_max=0.2,
                     log_var_ratio_mean=0.1, running_var_min=1.0, weight_rms=gain)


def test_drift_in_the_worst_channels_and_from_a_shift_midway():
    h = history({"bn": "norm"})
    for t in range(100):  # a few channels shifted from step 60 on: the mean over channels stays at 0.5
        h.add(StepRecord(step=t, norms={"bn": _norm(0.5, 9.0 if t >= 60 else 1.0)}))
    found = normalization.analyze(h, TH)
    assert kinds(found) == [("normalization_drift", "bn", "warning")]
    assert found[0].step == 60 and found[0].evidence["mean_gap_max"] == 9.0
    assert "worst channels" in found[0].message


def test_gain_collapse_against_its_own_start():
    h = history({"ln": "norm"})
    for t in range(50):
        h.add(StepRecord(step=t, norms={"ln": _norm(0.1, 0.2, gain=0.95**t)}))
    found = normalization.analyze(h, TH)
    assert kinds(found) == [("normalization_drift", "ln", "warning")]
    first_below = next(t for t in range(50) if 0.95**t < 0.1)
    assert found[0].step == first_below and found[0].evidence["gain_ratio"] == pytest.approx(0.95**49)


# --- messages ------------------------------------------------------------------------------------------------


def test_one_parameter_reads_in_the_singular():
    assert verb("receive", ["ln_1.weight"]) == "receives"
    assert verb("receive", ["fc2.weight", "fc2.bias"]) == "receive"
    assert verb("they never train", ["a"]) == "it never trains"


def test_a_nan_loss_hint_does_not_blame_the_learning_rate():
    h = history({"l0": "linear"})
    for t in range(10):
        h.add(step(t, {"l0": 1.0}, loss_=1.0 if t < 5 else math.nan))
    div = [f for f in optimizer.analyze(h, TH) if f.kind == "loss_divergence"]
    assert div and "learning rate" not in div[0].hint.lower() and "nonfinite" in div[0].hint


def test_a_zero_rmsnorm_gain_outputs_zero_not_its_bias():
    stats = [tensor_stats("norm.weight", torch.zeros(8)), tensor_stats("fc.weight", torch.randn(8, 8))]
    found = [f for f in rules.analyze(stats, TH, {"epoch": 3}, {"norm": "norm"}) if f.layer == "norm"]
    assert found and "bias" not in found[0].message and "exactly zero" in found[0].message
