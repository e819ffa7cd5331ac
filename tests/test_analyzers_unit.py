"""Analyzers as pure functions over hand-built histories: each rule, each gate, each severity.

Expected values are written as the arithmetic that produces them. End-to-end checks on real training runs
live in test_zoo_findings.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradscope.analyzers import activations, analyze, gradients, normalization, numerics, parameters
from gradscope.config import Thresholds
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


def make_history(roles: dict[str, str], *, biases: bool = False, optimizer: bool = False) -> History:
    """Layers in forward order; every 'linear' layer owns a 4x4 weight (and a bias if asked)."""
    layers: dict[str, LayerInfo] = {}
    params: dict[str, ParamInfo] = {}
    for order, (name, role) in enumerate(roles.items()):
        info = LayerInfo(name=name, type=role.title(), role=role, order=order)
        if role in ("linear", "recurrent"):
            shapes = {"weight": (4, 4), **({"bias": (4,)} if biases else {})}
            for pn, shape in shapes.items():
                full = f"{name}.{pn}"
                info.params.append(full)
                params[full] = ParamInfo(
                    name=full, layer=name, shape=shape, numel=math.prod(shape), dtype="float32",
                    in_optimizer=True if optimizer else None,
                )
        if role == "saturating":
            info.saturation = (-0.9747, 0.9747)
        layers[name] = info
    return History(layers=layers, params=params, has_optimizer=optimizer)


def grad_record(step: int, grads: dict[str, float], *, weight: float = 1.0, loss: float | None = None,
                update: dict[str, float] | None = None, skipped: bool = False) -> StepRecord:
    rec = StepRecord(step=step, loss=loss, skipped=skipped)
    for layer, g in grads.items():
        u = None if update is None else update[layer]
        rec.params[f"{layer}.weight"] = ParamStats(
            grad_norm=g, weight_norm=weight, grad_nonfinite=not math.isfinite(g), update_norm=u
        )
    return rec


def kinds(found: list) -> list[tuple[str, str, str]]:
    return [(f.kind, f.layer, f.severity) for f in found]


# --- vanishing_gradient --------------------------------------------------------------------------------


def test_vanishing_depth_and_absolute_at_the_earliest_layer():
    h = make_history({"l0": "linear", "l1": "linear", "l2": "linear"})
    for t in range(10):
        h.add(grad_record(t, {"l0": 1e-9, "l1": 1e-3, "l2": 1e-2}, loss=1.0))
    found = gradients.analyze(h, TH)
    assert kinds(found) == [("vanishing_gradient", "l0", "critical")]
    f = found[0]
    assert f.step == 0
    assert f.evidence["depth_ratio"] == pytest.approx(1e-9 / 1e-2)
    assert f.evidence["reference_layer"] == "l2"
    assert f.evidence["grad_to_weight"] == pytest.approx(1e-9 / 1.0)
    assert f.message.endswith(".") and f.hint


def test_normal_depth_gap_biases_and_single_probe():
    # Last layer 100x the first is normal; a tiny bias gradient is normal (biases are not counted).
    h = make_history({"l0": "linear", "l1": "linear"}, biases=True)
    for t in range(10):
        rec = grad_record(t, {"l0": 1e-3, "l1": 1e-1}, loss=1.0)
        rec.params["l0.bias"] = ParamStats(grad_norm=1e-15, weight_norm=1.0)
        h.add(rec)
    assert gradients.analyze(h, TH) == []
    # One probe step, no loss and no optimizer: nothing to gate on, the depth rule stands (warning band).
    probe = make_history({"l0": "linear", "l1": "linear"})
    probe.add(grad_record(0, {"l0": 1e-6, "l1": 1e-1}))
    assert kinds(gradients.analyze(probe, TH)) == [("vanishing_gradient", "l0", "warning")]
    assert gradients.analyze(probe, TH)[0].evidence["depth_ratio"] == pytest.approx(1e-6 / 1e-1)


def test_gradients_shrinking_with_convergence_are_not_vanishing():
    h = make_history({"l0": "linear", "l1": "linear"})
    for t in range(12):
        shrink = 0.1**t  # every gradient and the loss fall together
        h.add(grad_record(t, {"l0": 1e-3 * shrink, "l1": 1e-2 * shrink}, loss=2.0 * shrink))
    assert gradients.analyze(h, TH) == []


def test_vanishing_gated_on_symptoms():
    # Gap 1e-5 (< 1e-4, > 1e-6: warning band). Adam-like: every layer moves by 1e-3 of its weights and
    # the loss improves -> the early layer is not stuck, no finding.
    def run(update: dict[str, float], losses: list[float]) -> list:
        h = make_history({"l0": "linear", "l1": "linear"})
        for t, loss in enumerate(losses):
            h.add(grad_record(t, {"l0": 1e-6, "l1": 1e-1}, loss=loss, update=update))
        return gradients.analyze(h, TH)

    improving = [1.0 - 0.05 * t for t in range(12)]
    gated = run({"l0": 1e-3, "l1": 1e-3}, improving)  # kept, lowered to info, saying which gate
    assert kinds(gated) == [("vanishing_gradient", "l0", "info")]
    assert "loss improved" in str(gated[0].evidence["gate"])
    # SGD-like: the update follows the gradient, so l0 moves 1e-5 as much as l1 -> stuck, reported.
    found = run({"l0": 1e-8, "l1": 1e-3}, improving)
    assert kinds(found) == [("vanishing_gradient", "l0", "warning")]
    assert found[0].evidence["update_to_weight"] == pytest.approx(1e-8 / 1.0)
    # Moving as fast as l1 while the loss is flat: the small gradient does not keep it from training (a
    # healthy BERT on its initial plateau, queries and keys at 5e-5 under Adam) -> kept as info.
    moving = run({"l0": 1e-3, "l1": 1e-3}, [1.0] * 12)
    assert kinds(moving) == [("vanishing_gradient", "l0", "info")]
    assert "move as fast" in str(moving[0].evidence["gate"])
    # Not moving and the loss is flat -> a warning.
    assert kinds(run({"l0": 1e-8, "l1": 1e-3}, [1.0] * 12)) == [("vanishing_gradient", "l0", "warning")]


def test_vanishing_step_is_the_first_step_it_held():
    h = make_history({"l0": "linear", "l1": "linear"})
    for t in range(15):
        g0 = 1e-2 if t < 5 else 1e-10  # healthy for 5 steps, then gone: 10/15 of the window
        h.add(grad_record(t, {"l0": g0, "l1": 1e-2}, loss=1.0))
    found = gradients.analyze(h, TH)
    assert kinds(found) == [("vanishing_gradient", "l0", "critical")]
    assert found[0].step == 5


# --- exploding_gradient --------------------------------------------------------------------------------


def test_exploding_growth_starting_mid_run_reports_its_onset():
    h = make_history({"l0": "linear", "l1": "linear"})
    for t in range(50):
        g = 1.0 if t < 40 else 10.0 ** (t - 39)  # x10 per step from step 40
        loss = 1.0 if t < 40 else 1.0 + (t - 39)  # and the loss rises with it
        h.add(grad_record(t, {"l0": g, "l1": g}, loss=loss))
    found = gradients.analyze(h, TH)
    assert kinds(found) == [("exploding_gradient", "l0", "critical"), ("exploding_gradient", "l1", "critical")]
    f = found[0]
    assert f.step == 40  # first above 1e3 x the baseline at 43 (1e4 > 1e3 x 1); rising since 40
    assert f.evidence["baseline_grad_norm"] == pytest.approx(1.0)
    assert f.evidence["growth"] == pytest.approx(10.0 ** (49 - 39) / 1.0)


def test_one_off_spike_is_a_warning():
    h = make_history({"l0": "linear"})
    for t in range(20):
        h.add(grad_record(t, {"l0": 1e4 if t == 10 else 1.0}, loss=1.0))
    found = gradients.analyze(h, TH)
    assert kinds(found) == [("exploding_gradient", "l0", "warning")]
    assert found[0].step == 10
    assert found[0].evidence["growth"] == pytest.approx(1e4 / 1.0)


def test_gradient_large_relative_to_weights_sustained():
    h = make_history({"l0": "linear"})
    for t in range(10):
        h.add(grad_record(t, {"l0": 5e3}, weight=1.0, loss=3.0))
    found = gradients.analyze(h, TH)
    assert kinds(found) == [("exploding_gradient", "l0", "critical")]
    assert found[0].evidence["grad_to_weight"] == pytest.approx(5e3 / 1.0)


def test_zero_initialized_layer_waking_up_is_not_exploding():
    # A zero-init layer: tiny weights and gradients that grow 1e6-fold while the loss steadily improves.
    h = make_history({"l0": "linear", "l1": "linear"})
    for t in range(30):
        w = 1e-3 * (t + 1)
        rec = grad_record(t, {"l0": 1e-6 * 2**t, "l1": 1e-1}, weight=w, loss=1.0 / (t + 1))
        h.add(rec)
    found = [f for f in gradients.analyze(h, TH) if f.kind == "exploding_gradient"]
    assert [f.severity for f in found] in ([], ["info"])  # a gate lowers it to info, never louder


def test_skipped_overflow_steps_are_not_exploding_gradients():
    h = make_history({"l0": "linear"})
    for t in range(20):
        h.add(grad_record(t, {"l0": math.inf if t in (3, 4) else 1.0}, loss=1.0 - 0.01 * t, skipped=t in (3, 4)))
    assert gradients.analyze(h, TH) == []


def test_growth_into_nan_is_sustained_and_exact_zero_gradient_is_a_cut():
    h = make_history({"l0": "linear", "l1": "linear"})
    for t in range(12):
        g = 1.0 if t < 8 else (1e4 if t == 8 else math.nan)  # one huge step, then NaN for good
        h.add(grad_record(t, {"l0": g, "l1": 1.0}, loss=1.0))
    assert kinds(gradients.analyze(h, TH)) == [("exploding_gradient", "l0", "critical")]
    z = make_history({"l0": "linear", "l1": "linear"})
    for t in range(10):
        z.add(grad_record(t, {"l0": 0.0, "l1": 1e-2}, loss=1.0))
    found = gradients.analyze(z, TH)
    assert kinds(found) == [("vanishing_gradient", "l0", "critical")]
    assert "exactly zero" in found[0].message and "dead_relu" in found[0].hint


# --- dead_relu -----------------------------------------------------------------------------------------


def act(alive: list[bool] | np.ndarray, *, batch: int = 8, nan: int = 0, sat: float | None = None) -> ActivationStats:
    alive = np.asarray(alive, dtype=bool)
    return ActivationStats(
        numel=batch * alive.size, mean=0.1, std=0.1, rms=0.1, absmax=1.0, zero_frac=0.5, neg_frac=0.0,
        nan=nan, inf=0, saturated_frac=sat, alive=alive,
    )


def test_dead_relu_shares_and_severities():
    h = make_history({"fc": "linear", "act": "relu", "fc2": "linear", "act2": "relu"})
    for t in range(20):
        rec = StepRecord(step=t)
        rec.activations["act"] = act([True, True] + [False] * 8)  # 8/10 dead
        rec.activations["act2"] = act([False] * 10)  # all dead
        h.add(rec)
    found = activations.analyze(h, TH)
    assert kinds(found) == [("dead_relu", "act", "warning"), ("dead_relu", "act2", "critical")]
    assert found[0].evidence["dead_fraction"] == pytest.approx(8 / 10)
    assert found[0].evidence["samples"] == 20 * 8  # window of 20 steps x 8 samples per unit
    assert found[1].evidence["dead_units"] == 10


def test_ordinary_sparsity_dropout_and_too_few_samples_are_not_death():
    rng = np.random.default_rng(0)
    h = make_history({"act": "relu", "drop": "dropout"})
    for t in range(20):
        rec = StepRecord(step=t)
        # Per step, about half the units are zero for the whole (small) batch, but never the same ones
        # on every step: the OR over the window covers every unit.
        mask = rng.random(64) < 0.5
        mask[t % 64] = True
        rec.activations["act"] = act(mask | (np.arange(64) % 20 == t), batch=2)
        rec.activations["drop"] = act([False] * 64)
        h.add(rec)
    assert activations.analyze(h, TH) == []
    # One step of 4 samples: 60 % zero, but 4 samples per unit are too few to tell (needs 32).
    few = make_history({"act": "relu"})
    few.add(StepRecord(step=0, activations={"act": act([True] * 4 + [False] * 6, batch=4)}))
    assert activations.analyze(few, TH) == []


def test_dead_relu_window_ignores_nonfinite_steps_and_dates_the_death():
    h = make_history({"act": "relu"})
    for t in range(40):
        alive = [True] * 10 if t < 10 else [True] + [False] * 9  # 9 of 10 die at step 10
        rec = StepRecord(step=t, activations={"act": act(alive, nan=5 if t == 39 else 0)})
        if t == 39:
            rec.activations["act"].alive = np.zeros(10, dtype=bool)  # NaN looks dead: must be ignored
        h.add(rec)
    found = activations.analyze(h, TH)
    assert kinds(found) == [("dead_relu", "act", "critical")]
    assert found[0].evidence["dead_fraction"] == pytest.approx(9 / 10)
    assert found[0].step == 10


def test_dead_units_inherited_downstream_are_reported_once():
    h = make_history({"act": "relu", "pool": "other", "block": "container", "block.fc": "linear"})
    for t in range(10):
        rec = StepRecord(step=t)
        rec.activations["act"] = act([False] * 8 + [True] * 2)
        rec.activations["pool"] = act([False] * 8 + [True] * 2)  # max-pool of dead channels: inherited
        h.add(rec)
    assert kinds(activations.analyze(h, TH)) == [("dead_relu", "act", "warning")]
    # A custom block with a functional relu inside: its own output is the only place to see it.
    g = make_history({"block": "container", "block.fc": "linear", "head": "linear"})
    for t in range(10):
        g.add(StepRecord(step=t, activations={"block": act([False] * 10)}))
    assert kinds(activations.analyze(g, TH)) == [("dead_relu", "block", "critical")]


# --- saturated_activation ------------------------------------------------------------------------------


def test_saturation_hidden_vs_output_activation():
    h = make_history({"fc": "linear", "tanh": "saturating", "mid": "linear", "sig": "saturating",
                      "head": "linear", "out": "saturating"})
    for t in range(10):
        rec = StepRecord(step=t)
        rec.activations["tanh"] = act([True] * 4, sat=0.95)
        rec.activations["sig"] = act([True] * 4, sat=0.6)
        rec.activations["out"] = act([True] * 4, sat=0.99)  # confident classifier: by design
        h.add(rec)
    found = activations.analyze(h, TH)
    assert kinds(found) == [("saturated_activation", "tanh", "critical"), ("saturated_activation", "sig", "warning")]
    assert found[0].evidence["saturated_fraction"] == pytest.approx(0.95)
    assert (found[0].evidence["band_low"], found[0].evidence["band_high"]) == (-0.9747, 0.9747)


def test_passing_saturation_is_not_reported():
    h = make_history({"fc": "linear", "tanh": "saturating", "head": "linear"})
    for t in range(10):
        h.add(StepRecord(step=t, activations={"tanh": act([True] * 4, sat=0.95 if t < 2 else 0.05)}))
    assert activations.analyze(h, TH) == []


# --- normalization_drift -------------------------------------------------------------------------------


def norm(gap: float = 0.1, lvr: float = 0.1, *, training: bool = True, rv: float = 1.0, gain: float = 1.0,
         rms: float = 1.0) -> NormStats:
    return NormStats(training=training, input_rms=rms, mean_gap_max=2 * gap, mean_gap_mean=gap,
                     log_var_ratio_max=2 * lvr, log_var_ratio_mean=lvr, running_var_min=rv, weight_rms=gain)


def norm_history(steps: int, train=None, evals=None) -> History:
    h = make_history({"fc": "linear", "bn": "norm", "head": "linear"})
    for t in range(steps):
        rec = StepRecord(step=t, norms={"bn": (train or (lambda t: norm()))(t)})
        if evals is not None and t % 10 == 9:
            rec.eval_norms["bn"] = evals(t)
        h.add(rec)
    return h


def test_eval_distribution_shift_warning_and_critical():
    warn = normalization.analyze(norm_history(60, evals=lambda t: norm(5.0, 0.5, training=False)), TH)
    assert kinds(warn) == [("normalization_drift", "bn", "warning")]  # 5 > 3, but not > 2 x 3
    assert warn[0].evidence["mode"] == "eval" and warn[0].evidence["mean_gap"] == pytest.approx(5.0)
    assert warn[0].step == 39  # eval at 9, 19, 29 precede the warm-up of 30 steps
    crit = normalization.analyze(norm_history(60, evals=lambda t: norm(0.2, math.log(100), training=False)), TH)
    assert kinds(crit) == [("normalization_drift", "bn", "critical")]  # log(100) = 4.6 > 2 x 2.3


def test_running_stats_lagging_early_is_not_drift():
    h = norm_history(60, train=lambda t: norm(5.0, 3.0) if t < 30 else norm(0.1, 0.1),
                     evals=lambda t: norm(4.0, 0.1, training=False) if t < 30 else norm(0.2, 0.1, training=False))
    assert normalization.analyze(h, TH) == []


def test_running_variance_gain_and_input_growth():
    rv = normalization.analyze(norm_history(40, train=lambda t: norm(rv=1e-8 if t >= 35 else 1.0)), TH)
    assert kinds(rv) == [("normalization_drift", "bn", "warning")]
    assert rv[0].step == 35 and rv[0].evidence["running_var_min"] == pytest.approx(1e-8)
    collapse = normalization.analyze(norm_history(40, train=lambda t: norm(gain=10.0 ** (-t / 5))), TH)
    assert kinds(collapse) == [("normalization_drift", "bn", "warning")]
    # Judged against its own start: 10**(-6/5) < 0.1 x 1.0 <= 10**(-5/5).
    assert collapse[0].step == 6 and collapse[0].evidence["gain_ratio"] == pytest.approx(10.0 ** (-39 / 5))
    # A gain born at zero (zero-init residual branch) growing slowly has not collapsed.
    assert normalization.analyze(norm_history(40, train=lambda t: norm(gain=1e-5 * t)), TH) == []
    growth = normalization.analyze(norm_history(60, train=lambda t: norm(rms=1.2**t)), TH)
    assert kinds(growth) == [("normalization_drift", "bn", "warning")]
    assert growth[0].step == math.ceil(math.log(1e3) / math.log(1.2))  # 1.2**38 > 1e3 > 1.2**37
    assert growth[0].evidence["growth"] == pytest.approx(1.2**59)


def test_train_drift_sustained_after_warmup():
    h = norm_history(60, train=lambda t: norm(4.0, 0.1))
    found = normalization.analyze(h, TH)
    assert kinds(found) == [("normalization_drift", "bn", "warning")]
    assert found[0].evidence["mode"] == "train" and found[0].step == 30


# --- nonfinite -----------------------------------------------------------------------------------------


def test_nonfinite_first_module_in_forward_order_only():
    h = make_history({"a": "linear", "b": "other", "c": "linear"})
    for t in range(10):
        rec = StepRecord(step=t)
        bad = t >= 5
        for name in ("a", "b", "c"):
            # From step 5 "b" produces NaN and "c" inherits it; from step 6 the weights of "a" are NaN too.
            poisoned = (name == "b" and bad) or (name == "c" and bad) or (name == "a" and t >= 6)
            rec.activations[name] = act([True] * 4, nan=3 if poisoned else 0)
        h.add(rec)
    found = numerics.analyze(h, TH)
    assert kinds(found) == [("nonfinite", "b", "critical")]
    assert found[0].step == 5 and found[0].evidence["source"] == "activation"
    assert found[0].evidence["nan"] == 3


def test_nonfinite_backward_order_when_forward_is_clean():
    h = make_history({"a": "linear", "b": "linear"})
    rec = StepRecord(step=2)
    rec.gradients["a"] = GradStats(norm=math.nan, absmax=math.nan, nan=4, inf=0, order=1)
    rec.gradients["b"] = GradStats(norm=math.nan, absmax=math.nan, nan=4, inf=0, order=0)
    h.add(rec)
    found = numerics.analyze(h, TH)
    assert kinds(found) == [("nonfinite", "b", "critical")] and found[0].evidence["source"] == "gradient"


def test_weight_nonfinite_reports_the_owner():
    h = make_history({"a": "linear"})
    h.add(StepRecord(step=0, params={"a.weight": ParamStats(grad_norm=1.0, weight_norm=math.nan, weight_nonfinite=True)}))
    found = numerics.analyze(h, TH)
    assert kinds(found) == [("nonfinite", "a", "critical")] and found[0].evidence["param"] == "a.weight"


def overflow_history(skipped: set[int], steps: int = 40) -> History:
    h = make_history({"a": "linear"})
    for t in range(steps):
        over = t in skipped
        h.add(grad_record(t, {"a": math.inf if over else 1.0}, skipped=over))
    return h


def test_grad_scaler_overflow_is_info_unless_it_persists():
    calibrating = numerics.analyze(overflow_history({0, 1, 2, 3, 4, 5, 6}), TH)  # leading run: calibration
    assert kinds(calibrating) == [("nonfinite", "a", "info")]
    assert calibrating[0].evidence["skipped_steps"] == 7 and calibrating[0].evidence["longest_skip_run"] == 7
    assert calibrating[0].evidence["longest_run_after_calibration"] == 0
    occasional = numerics.analyze(overflow_history({10, 20, 21}), TH)
    assert kinds(occasional) == [("nonfinite", "a", "info")]
    persistent = numerics.analyze(overflow_history({10, 11, 12, 13, 14, 15}), TH)  # 6 >= 5 in a row
    assert kinds(persistent) == [("nonfinite", "a", "warning")]
    assert persistent[0].evidence["longest_skip_run"] == 6
    stuck = numerics.analyze(overflow_history(set(range(30, 40))), TH)  # still skipping at the end
    assert kinds(stuck) == [("nonfinite", "a", "critical")]


def test_overflow_then_an_applied_nonfinite_weight_is_critical_there():
    h = overflow_history({2})
    h.add(StepRecord(step=40, params={"a.weight": ParamStats(grad_norm=1.0, weight_norm=math.inf, weight_nonfinite=True)}))
    found = numerics.analyze(h, TH)
    assert kinds(found) == [("nonfinite", "a", "critical")] and found[0].step == 40


def test_nan_loss_between_collected_steps_is_dated_by_the_loss():
    # every=10: the loss went NaN at uncollected step 25; NaN weights were first seen at step 30.
    h = make_history({"a": "linear", "b": "linear"})
    h.add(StepRecord(step=20, activations={"a": act([True] * 4)}))
    h.add(StepRecord(step=30, activations={"a": act([True] * 4, nan=16), "b": act([True] * 4, nan=16)}))
    for st in range(21, 30):
        h.add_loss(st, math.nan if st >= 25 else 1.0)  # losses arrive after the record (engine order)
    found = numerics.analyze(h, TH)
    assert kinds(found) == [("nonfinite", "", "critical")] and found[0].step == 25
    assert found[0].evidence["first_seen_layer"] == "a" and found[0].evidence["first_seen_step"] == 30


# --- unused_parameter / not_in_optimizer ---------------------------------------------------------------


def param_history(optimizer: bool, steps: int = 5, *, moved: bool = False) -> History:
    h = make_history({"fc": "linear", "aux": "linear", "frozen": "linear", "outside": "linear"}, optimizer=optimizer)
    h.params["frozen.weight"].requires_grad = False
    if optimizer:
        h.params["outside.weight"].in_optimizer = False
    for t in range(steps):
        rec = StepRecord(step=t)
        rec.params["fc.weight"] = ParamStats(grad_norm=1.0, weight_norm=2.0)
        rec.params["aux.weight"] = ParamStats(grad_norm=None, weight_norm=2.0)
        rec.params["outside.weight"] = ParamStats(grad_norm=1.0, weight_norm=2.0 + (0.1 * t if moved else 0.0))
        h.add(rec)
    return h


def test_unused_parameter_skips_frozen_and_needs_a_few_steps():
    found = parameters.analyze(param_history(False), TH)
    assert kinds(found) == [("unused_parameter", "aux", "warning")]
    assert found[0].evidence == {"params": "aux.weight", "numel": 16, "collected_steps": 5}
    assert parameters.analyze(param_history(False, steps=2), TH) == []  # < min_steps collected


def test_not_in_optimizer_only_with_an_optimizer():
    assert [f for f in parameters.analyze(param_history(False), TH) if f.kind == "not_in_optimizer"] == []
    found = [f for f in parameters.analyze(param_history(True), TH) if f.kind == "not_in_optimizer"]
    assert kinds(found) == [("not_in_optimizer", "outside", "critical")]  # weights never moved
    moved = [f for f in parameters.analyze(param_history(True, moved=True), TH) if f.kind == "not_in_optimizer"]
    assert kinds(moved) == [("not_in_optimizer", "outside", "warning")]  # something else updates it


# --- analyze(): merged and sorted ----------------------------------------------------------------------


def test_analyze_merges_per_kind_and_layer_and_sorts():
    h = make_history({"l0": "linear", "act": "relu", "l1": "linear"})
    for t in range(20):
        rec = grad_record(t, {"l0": 1e-9, "l1": 1e-2}, loss=1.0)
        rec.activations["act"] = act([False] * 6 + [True] * 4)  # 60 % dead: warning
        h.add(rec)
    found = analyze(h, TH)
    assert kinds(found) == [("vanishing_gradient", "l0", "critical"), ("dead_relu", "act", "warning")]
    assert all(f.to_dict()["evidence"] for f in found)
