"""The optimizer analyzer as pure functions over hand-built histories: each rule, each gate, each severity.

Expected values are written as the arithmetic that produces them. Real training runs live in
test_optimizer_runs.py.
"""

from __future__ import annotations

import math

import pytest

from gradscope.analyzers import optimizer
from gradscope.config import Thresholds
from gradscope.findings import Kind
from gradscope.stats.history import History
from gradscope.stats.records import LayerInfo, ParamInfo, ParamStats, StepRecord

TH = Thresholds()
UPDATE, LOSS = Kind.UPDATE_RATIO.value, Kind.LOSS_DIVERGENCE.value


def make_history(layers: tuple[str, ...] = ("fc",)) -> History:
    """Linear layers in forward order, each owning a 4x4 weight and a bias, all in the optimizer."""
    infos: dict[str, LayerInfo] = {}
    params: dict[str, ParamInfo] = {}
    for order, name in enumerate(layers):
        infos[name] = LayerInfo(name=name, type="Linear", role="linear", order=order,
                                params=[f"{name}.weight", f"{name}.bias"])
        for pn, shape in (("weight", (4, 4)), ("bias", (4,))):
            full = f"{name}.{pn}"
            params[full] = ParamInfo(name=full, layer=name, shape=shape, numel=math.prod(shape),
                                     dtype="float32", in_optimizer=True, group=0)
    return History(layers=infos, params=params, has_optimizer=True, optimizer_types=["SGD"])


def record(step: int, ratio: dict[str, float], *, lr: float = 0.1, weight: float = 2.0,
           loss: float | None = None, adam: float | None = None) -> StepRecord:
    """One collected step where each layer's weight moved by ``ratio * weight`` (its bias by 1e9: ignored)."""
    rec = StepRecord(step=step, loss=loss, lrs=[lr])
    for layer, r in ratio.items():
        rec.params[f"{layer}.weight"] = ParamStats(grad_norm=1.0, weight_norm=weight, update_norm=r * weight,
                                                   lr=lr, adam_step_rms=adam)
        # A zero-initialized bias: its ratio is meaningless and must not count.
        rec.params[f"{layer}.bias"] = ParamStats(grad_norm=1.0, weight_norm=0.0, update_norm=1e9, lr=lr)
    return rec


def run(ratios: list[float], losses: list[float] | None, *, lrs: list[float] | None = None,
        every: int = 1, extra_losses: bool = False, layer: str = "fc") -> History:
    """A history with one layer's update ratio per collected step and, optionally, a loss per step."""
    h = make_history((layer,))
    for i, r in enumerate(ratios):
        step = i * every
        lr = lrs[i] if lrs is not None else 0.1
        h.add(record(step, {layer: r}, lr=lr, loss=losses[step] if losses and not extra_losses else None))
    if losses and extra_losses:
        for step, v in enumerate(losses):
            h.add_loss(step, v)
    return h


def found(h: History, kind: str | None = None) -> list:
    return [f for f in optimizer.analyze(h, TH) if kind is None or f.kind == kind]


def falling(n: int, start: float = 2.0, end: float = 0.5) -> list[float]:
    return [start + (end - start) * t / (n - 1) for t in range(n)]


def noisy(n: int, level: float, seed: int = 0, amp: float = 0.5) -> list[float]:
    """A deterministic noisy loss: level * (1 +/- amp), from a small linear congruential generator."""
    x, out = seed + 1, []
    for _ in range(n):
        x = (1103515245 * x + 12345) % (1 << 31)
        out.append(level * (1 + amp * (2 * x / (1 << 31) - 1)))
    return out


# --- building blocks ----------------------------------------------------------------------------------


def test_first_sustained_needs_a_share_of_the_window_and_min_count():
    f = optimizer.first_sustained
    assert f([True, False, False, False, True, True, True, False], 5, 0.6, 3) == 4  # 3 of the 4 left
    assert f([True, True, False, False, False, False], 5, 0.6, 3) is None  # a one-off of two
    assert f([False, True, True, False, True, False], 5, 0.6, 3) == 1  # 3 of 5 = 0.6
    assert f([True, True], 5, 0.6, 3) is None  # fewer than min_count in all


def test_layer_ratio_combines_weight_matrices_and_ignores_biases():
    h = make_history(("fc",))
    rec = StepRecord(step=0, lrs=[0.1])
    rec.params["fc.weight"] = ParamStats(grad_norm=1.0, weight_norm=4.0, update_norm=3.0, lr=0.1)
    rec.params["fc.bias"] = ParamStats(grad_norm=1.0, weight_norm=0.0, update_norm=5.0, lr=0.1)
    h.add(rec)
    s = optimizer.update_series(h)["fc"]
    assert s.ratio == [pytest.approx(3.0 / 4.0)]
    assert s.lr == [0.1]


def test_ratio_is_rescaled_to_the_peak_learning_rate():
    s = optimizer.UpdateSeries(steps=[0, 1, 2], ratio=[1e-3, 1e-5, 0.0], lr=[0.1, 1e-3, 0.0])
    assert s.lr_peak == 0.1
    # at lr 1e-3 the same step at the peak 0.1 would be 100x larger; at lr 0 there is nothing to judge
    assert s.at_peak() == [pytest.approx(1e-3), pytest.approx(1e-5 * 0.1 / 1e-3), None]


def test_update_ratio_of_non_finite_steps():
    assert optimizer._ratio(math.inf, 2.0) == math.inf  # the step itself blew up
    assert optimizer._ratio(1.0, math.nan) is None  # weights already NaN: nonfinite's business
    assert optimizer._ratio(0.0, 0.0) is None
    assert optimizer._ratio(1.0, 0.0) == math.inf


def test_loss_change_compares_first_and_last_third():
    pts = list(enumerate([4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.0]))
    assert optimizer.loss_change(pts) == pytest.approx((4.0 - 1.0) / 4.0)
    assert optimizer.loss_change(pts[:5]) is None  # too few to tell (the shared helper needs six)
    assert optimizer.loss_change([*pts, (8, math.nan)]) == -math.inf


# --- update_ratio: too large --------------------------------------------------------------------------


def test_large_updates_with_diverging_loss_are_critical_from_their_first_step():
    ratios = [1e-3] * 30 + [0.3] * 30  # the lr was raised at step 30
    losses = falling(30) + [0.5 * 2.0 ** (t + 1) for t in range(30)]  # then the loss doubles every step
    out = found(run(ratios, losses), UPDATE)
    assert len(out) == 1 and out[0].severity == "critical" and out[0].layer == "fc"
    assert out[0].step == 30
    assert out[0].evidence["update_ratio"] == pytest.approx(0.3)
    assert out[0].evidence["loss"] == "diverging"
    assert "lower the learning rate for layer 'fc'" in out[0].hint.lower() and "warm-up" in out[0].hint


def test_large_updates_while_the_loss_improves_are_not_a_finding():
    # 0.2 of the weight per step is a lot, but the loss falls steadily: a choice, not a bug.
    assert found(run([0.2] * 40, falling(40)), UPDATE) == []


def test_large_updates_while_the_loss_is_flat_are_a_warning():
    out = found(run([0.2] * 40, noisy(40, 1.0, amp=0.05)), UPDATE)
    assert [(f.severity, f.step) for f in out] == [("warning", 0)]
    assert out[0].evidence["threshold"] == TH.update_ratio_high
    assert out[0].evidence["update_ratio_median"] == pytest.approx(0.2)


def test_weights_rewritten_every_step_are_critical_even_without_a_loss():
    out = found(run([3.0] * 20, None), UPDATE)
    assert [(f.severity, f.step) for f in out] == [("critical", 0)]
    assert out[0].evidence["loss"] == "not given"
    # ...but large-not-huge updates without a loss to judge them by are left alone
    assert found(run([0.3] * 20, None), UPDATE) == []


def test_a_zero_initialized_layer_first_steps_are_not_sustained():
    # ||w|| grows from 0: the ratio is inf, then 1/t; the loss improves. Nothing wrong.
    ratios = [math.inf] + [1.0 / t for t in range(1, 40)]
    h = run(ratios, falling(40))
    h.records[0].params["fc.weight"] = ParamStats(grad_norm=1.0, weight_norm=0.0, update_norm=0.2, lr=0.1)
    assert found(h, UPDATE) == []


def test_a_single_blow_up_step_followed_by_divergence_is_critical():
    # One step 50x the weight, then the layer stops moving (its gradients died) while the loss explodes.
    ratios = [1e-3] * 20 + [50.0] + [0.0] * 19
    losses = falling(20) + [10.0 ** (t + 1) for t in range(20)]
    out = found(run(ratios, losses), UPDATE)
    assert [(f.severity, f.step) for f in out] == [("critical", 20)]
    assert out[0].evidence["update_ratio"] == 50.0


# --- update_ratio: too small --------------------------------------------------------------------------


def test_tiny_updates_at_the_peak_lr_with_a_flat_loss_are_a_warning():
    out = found(run([1e-8] * 30, noisy(30, 2.0, amp=0.02), lrs=[1e-7] * 30), UPDATE)
    assert [(f.severity, f.step) for f in out] == [("warning", 0)]
    f = out[0]
    assert f.evidence["update_ratio_at_peak_lr"] == pytest.approx(1e-8)
    assert f.evidence["lr_peak"] == 1e-7
    assert "too low" in f.hint and "frozen" in f.hint


def test_tiny_updates_while_the_loss_improves_are_not_a_finding():
    assert found(run([1e-8] * 30, falling(30), lrs=[1e-7] * 30), UPDATE) == []


def test_tiny_updates_without_a_loss_are_not_judged():
    assert found(run([1e-8] * 30, None, lrs=[1e-7] * 30), UPDATE) == []


def test_tiny_updates_at_the_end_of_a_cosine_decay_are_by_design():
    n, peak = 40, 0.1
    lrs = [peak * 0.5 * (1 + math.cos(math.pi * t / n)) for t in range(n)]
    # the step is proportional to the lr: 1e-3 at the peak, ~1e-6 near the end (raw ratio far below low)
    ratios = [1e-3 * lr / peak for lr in lrs]
    assert ratios[-1] < TH.update_ratio_low
    # a flat loss near the end is not the schedule's fault either
    assert found(run(ratios, noisy(n, 1.0, amp=0.02), lrs=lrs), UPDATE) == []


def test_tiny_updates_during_warm_up_are_by_design():
    n = 30
    lrs = [1e-3 * (t + 1) / 1000 for t in range(n)]  # a 1000-step warm-up, seen in its first 30 steps
    ratios = [lr * 1e-2 for lr in lrs]  # ~1e-8 .. 3e-7: tiny, and the loss has not moved yet
    assert found(run(ratios, noisy(n, 1.0, amp=0.02), lrs=lrs), UPDATE) == []


def test_a_layer_whose_lr_is_zero_is_not_judged():
    assert found(run([0.0] * 30, noisy(30, 1.0, amp=0.02), lrs=[0.0] * 30), UPDATE) == []


def test_adam_effective_lr_is_evidence_when_measured():
    h = make_history(("fc",))
    losses = falling(20) + [0.5 * 2.0 ** (t + 1) for t in range(20)]
    for t in range(40):
        h.add(record(t, {"fc": 0.5 if t >= 20 else 1e-3}, lr=1e-3, loss=losses[t], adam=1e-3 / 1e-8))
    out = found(h, UPDATE)
    assert len(out) == 1
    assert out[0].evidence["adam_effective_lr"] == pytest.approx(1e-3 / 1e-8)
    assert out[0].evidence["adam_effective_lr_over_lr"] == pytest.approx(1.0 / 1e-8)  # lr / eps over lr


def test_one_finding_per_layer_in_model_order():
    h = make_history(("a", "b"))
    for t in range(30):
        h.add(record(t, {"a": 3.0, "b": 1e-3}, loss=1.0 + 0.01 * (t % 2)))
    out = found(h, UPDATE)
    assert [(f.layer, f.severity) for f in out] == [("a", "critical")]


# --- loss_divergence ----------------------------------------------------------------------------------


def test_a_rising_loss_is_critical_at_the_step_it_is_seen():
    losses = falling(40, 2.0, 0.2) + [0.2 * 1.2 ** (t + 1) for t in range(40)]
    out = found(run([1e-3] * 80, losses), LOSS)
    assert len(out) == 1
    f = out[0]
    assert (f.kind, f.layer, f.severity, f.evidence["how"]) == (LOSS, "", "critical", "rise")
    assert f.step > 40
    assert f.evidence["loss"] >= TH.loss_rise * f.evidence["loss_min"]


def test_a_rise_that_came_back_down_is_a_warning():
    # noisy 1.0, ramped up to 4.0 and held, then back down: no single step is a spike
    shape = [1.0] * 40 + [1.0 + 0.3 * t for t in range(1, 11)] + [4.0] * 20 + [4.0 - 0.3 * t for t in range(1, 11)]
    shape += [1.0] * 40
    losses = [a * b for a, b in zip(shape, noisy(len(shape), 1.0, amp=0.1), strict=True)]
    out = found(run([1e-3] * len(losses), losses), LOSS)
    assert [(f.severity, f.evidence["how"]) for f in out] == [("warning", "rise")]
    assert 40 < out[0].step < 70 and "come back down" in out[0].message


def test_a_spike_far_above_the_recent_range_is_a_warning():
    losses = noisy(60, 1.0, amp=0.1)
    losses[45] = 1.0 + 20 * 0.2  # 20x the recent range (~0.2) above the median
    out = found(run([1e-3] * 60, losses), LOSS)
    assert [(f.severity, f.step, f.evidence["how"]) for f in out] == [("warning", 45, "spike")]


@pytest.mark.parametrize("seed", range(5))
def test_noisy_small_batch_loss_is_not_divergence(seed):
    # +/-90 % around a falling level: the range covers it, the level falls, nothing to report.
    level = falling(300, 2.0, 0.5)
    losses = [lv * v for lv, v in zip(level, noisy(300, 1.0, seed=seed, amp=0.9), strict=True)]
    assert found(run([1e-3] * 30, losses, every=10, extra_losses=True), LOSS) == []


def test_a_converged_loss_bouncing_near_zero_is_not_divergence():
    # 2.0 -> 1e-4, then noise between 1e-4 and 5e-4: 5x its minimum, but a tiny share of the progress made.
    losses = falling(50, 2.0, 1e-4) + [1e-4 * (1 + 4 * (t % 3 == 0)) for t in range(100)]
    assert found(run([1e-3] * 15, losses, every=10, extra_losses=True), LOSS) == []


def test_a_non_finite_loss_is_critical_and_links_the_nonfinite_layer():
    h = make_history(("fc", "head"))
    h.add(record(0, {"fc": 1e-3, "head": 1e-3}))
    for t, v in enumerate(falling(10)):
        h.add_loss(t, v)
    bad = record(10, {"fc": 1e-3, "head": 1e-3})
    bad.params["head.weight"].weight_nonfinite = True  # head's weight went NaN at step 10 ...
    h.add(bad)
    h.add_loss(10, math.nan)  # ... and so did the loss
    assert (h.first_nonfinite.layer, h.first_nonfinite.step) == ("head", 10)
    out = found(h, LOSS)
    assert len(out) == 1
    f = out[0]
    assert (f.severity, f.step, f.evidence["how"]) == ("critical", 10, "nonfinite")
    assert f.evidence["nonfinite_layer"] == "head"
    assert f.evidence["last_finite_loss"] == pytest.approx(0.5)
    assert "head" in f.message and "head" in f.hint


def test_a_negative_loss_that_rises_is_divergence():
    # e.g. a negative log-likelihood: -3 .. -2.9, then up to +4: a rise of 7 >= (3 - 1) * |-3|.
    losses = [-3.0 + 0.1 * (t % 2) for t in range(40)] + [4.0] * 30
    out = found(run([1e-3] * 70, losses), LOSS)
    assert [(f.severity, f.evidence["how"]) for f in out] == [("critical", "rise")]


def test_no_losses_no_divergence_finding():
    assert found(run([1e-3] * 10, None), LOSS) == []
