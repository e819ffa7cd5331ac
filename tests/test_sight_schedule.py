"""The collection schedule, the burst observer, the per-step sentinels and the NaN-birth rule, in isolation."""

from __future__ import annotations

import math

import pytest
import torch

from gradscope.config import Schedule as ScheduleFromConfig
from gradscope.config import schedule_for as schedule_for_from_config
from gradscope.errors import UsageError
from gradscope.schedule import (
    BURST,
    DEFAULT_SCHEDULE,
    DENSE_START,
    Observed,
    Observer,
    Schedule,
    schedule_for,
)
from gradscope.stats.birth import first_nonfinite
from gradscope.stats.history import History
from gradscope.stats.records import (
    ActivationStats,
    GradStats,
    InputStats,
    LayerInfo,
    ParamInfo,
    ParamStats,
    StepRecord,
)
from gradscope.stats.sentinel import Sentinel, SentinelLog, grad_norm


def collected(schedule: Schedule, n: int, observed: Observed | None = None) -> list[int]:
    return [s for s in range(n) if schedule(s, observed)]


def test_config_still_exports_the_schedule():
    assert ScheduleFromConfig is Schedule and schedule_for_from_config is schedule_for


def test_every_n_is_exactly_every_nth_step_whatever_was_observed():
    sch = schedule_for(7)
    burst = Observed(burst_until=30)
    assert collected(sch, 40) == collected(sch, 40, burst) == [0, 7, 14, 21, 28, 35]
    assert not sch.adaptive
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(UsageError):
            schedule_for(bad)  # type: ignore[arg-type]


def test_default_schedule_is_dense_at_the_start_sampled_later_dense_in_a_burst():
    sch = schedule_for(None)
    assert sch is DEFAULT_SCHEDULE and sch.adaptive
    assert collected(sch, 60) == [*range(DENSE_START), 20, 30, 40, 50]
    assert collected(sch, 301)[-3:] == [200, 250, 300]
    # a burst observed to end before step 45 makes every step up to 44 collected
    assert collected(sch, 60, Observed(burst_until=45))[DENSE_START:] == [*range(DENSE_START, 45), 50]
    assert "every step before step 16" in sch.describe()


def feed(obs: Observer, values: list[float], name: str = "loss") -> list[int]:
    """Steps at which a burst started (or was extended)."""
    return [s for s, v in enumerate(values) if obs.observe(s, name, v)]


def test_a_falling_noisy_loss_starts_no_burst():
    # 2.0 falling to 1.0 with +-5 % noise: never above its recent range by more than that range
    values = [(2.0 - s / 500) * (1 + 0.05 * math.sin(1.7 * s)) for s in range(500)]
    assert feed(Observer(), values) == []


def test_a_spike_starts_a_burst_over_the_next_steps():
    obs = Observer()
    values = [1.0 + 0.01 * (s % 3) for s in range(30)] + [5.0] + [1.0] * 10
    assert feed(obs, values) == [30]
    assert obs.state.burst_until == 31 + BURST
    assert obs.bursts[0][0] == 31 and "loss left its recent range" in obs.bursts[0][1]


def test_a_value_becoming_non_finite_starts_a_burst_once():
    obs = Observer()
    values = [1.0] * 10 + [math.nan] * 20 + [1.0] * 5 + [math.inf]
    assert feed(obs, values, "grad_norm") == [10, 35]  # transitions only: a NaN run is one anomaly
    assert "grad_norm became non-finite at step 10" in obs.bursts[0][1]


def test_bursts_stay_within_their_budget():
    obs = Observer()
    values = []
    for s in range(2000):  # a spike every 40 steps: far more bursts than a run should pay for
        values.append(100.0 if s % 40 == 39 else 1.0)
    feed(obs, values)
    assert obs.burst_steps <= obs.budget_base + obs.budget_share * 2000
    assert obs.burst_steps > 0


def test_sentinel_reads_cpu_values_at_once_and_skips_other_inputs():
    sen = Sentinel()
    sen.push(0, "loss", torch.tensor(2.5, requires_grad=True) * 1.0)
    sen.push(1, "loss", 3.0)
    sen.push(2, "loss", torch.ones(3))  # not a scalar: ignored
    sen.push(3, "loss", torch.tensor(4))  # integer: ignored
    assert sen.poll() == [(0, "loss", 2.5), (1, "loss", 3.0)]
    assert sen.poll() == []


def test_sentinel_grad_norm_is_the_global_norm_of_existing_grads():
    a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 12.0])
    assert grad_norm([a, b, c]).item() == pytest.approx(math.sqrt(9 + 16 + 144))
    assert grad_norm([c]) is None
    b.grad[0] = math.nan
    assert math.isnan(grad_norm([a, b]).item())
    h = torch.zeros(2, dtype=torch.float16, requires_grad=True)
    h.grad = torch.full((2,), 60000.0, dtype=torch.float16)  # its norm overflows fp16, not fp32
    assert grad_norm([h]).item() == pytest.approx(60000.0 * math.sqrt(2), rel=1e-3)


def test_sentinel_log_keeps_the_first_non_finite_step_per_signal():
    log = SentinelLog()
    for s, v in [(0, 1.0), (1, math.nan), (2, math.inf)]:
        log.add(s, "grad_norm", v)
    log.add(5, "loss", math.inf)
    assert log.first_nonfinite == {"grad_norm": 1, "loss": 5}
    assert [s for s, _ in log.grad_norms] == [0, 1, 2]


# --- the birth rule on hand-built records -------------------------------------------------------------


def act(nan: int = 0) -> ActivationStats:
    return ActivationStats(numel=4, mean=0, std=1, rms=1, absmax=1, zero_frac=0, neg_frac=0, nan=nan, inf=0)


def grad(order: int, nan: int = 0) -> GradStats:
    return GradStats(norm=math.nan if nan else 1.0, absmax=1.0, nan=nan, inf=0, order=order)


def history(order: list[str]) -> History:
    layers = {n: LayerInfo(name=n, type="Linear", order=i) for i, n in enumerate(order)}
    params = {
        f"{n}.weight": ParamInfo(name=f"{n}.weight", layer=n, shape=(2,), numel=2, dtype="f") for n in order
    }
    return History(layers=layers, params=params)


def test_forward_birth_is_the_first_module_with_finite_inputs_and_a_nan_output():
    # finish order: attn.proj (child) before attn (parent), then block, then root ""
    h = history(["attn.q", "attn.proj", "attn", "block", ""])
    rec = StepRecord(step=3)
    rec.activations = {"attn.q": act(), "attn.proj": act(9), "attn": act(9), "block": act(9), "": act(9)}
    rec.inputs = {n: InputStats(nonfinite=n == "attn.proj") for n in rec.activations}
    ev = first_nonfinite(h, rec)
    assert (ev.layer, ev.source, ev.tensor, ev.born) == ("attn", "activation", "output", True)


def test_non_finite_data_is_named_as_the_input():
    h = history(["fc", ""])
    rec = StepRecord(step=0, activations={"fc": act(4), "": act(4)})
    rec.inputs = {"fc": InputStats(nonfinite=True), "": InputStats(nonfinite=True)}
    ev = first_nonfinite(h, rec)
    assert (ev.layer, ev.tensor, ev.born) == ("fc", "input", False)


def test_backward_birth_is_where_a_finite_output_gradient_became_a_nan_input_gradient():
    # backward order: head (0), bad (1), fc (2): bad's output gradient is finite, what it passed back not
    h = history(["fc", "bad", "head"])
    rec = StepRecord(step=5, activations={n: act() for n in ("fc", "bad", "head")})
    rec.gradients = {"head": grad(0), "bad": grad(1), "fc": grad(2, nan=8)}
    rec.inputs = {
        "head": InputStats(nonfinite=False, grad_nonfinite=False, grad_order=0),
        "bad": InputStats(nonfinite=False, grad_nonfinite=True, grad_order=1),
        "fc": InputStats(nonfinite=False),
    }
    ev = first_nonfinite(h, rec)
    assert (ev.layer, ev.source, ev.tensor, ev.born) == ("bad", "gradient", "input gradient", True)
    # without the input facts, the old rule names the first non-finite output gradient: the module before
    rec.inputs = {}
    assert first_nonfinite(h, rec).layer == "fc"


def test_a_parameter_gradient_born_under_a_finite_output_gradient_is_named():
    h = history(["fc", "head"])
    rec = StepRecord(step=1, gradients={"fc": grad(1), "head": grad(0)})
    rec.params = {
        "fc.weight": ParamStats(grad_norm=math.nan, weight_norm=1.0, grad_nonfinite=True),
        "head.weight": ParamStats(grad_norm=1.0, weight_norm=1.0),
    }
    ev = first_nonfinite(h, rec)
    assert (ev.layer, ev.source, ev.param, ev.born) == ("fc", "param_grad", "fc.weight", True)


def test_clip_summary_counts_only_steps_the_clip_acted_on():
    from gradscope.stats.clipping import clip_summary

    h = History()
    assert clip_summary(h) == {}
    for step, ratio in enumerate([1.0, 3.0, 1.0, 5.0, None]):
        h.add(StepRecord(step=step, clip_ratio=ratio))
    assert clip_summary(h) == {
        "clipped_steps": 2,
        "measured_steps": 4,
        "clipped_share": 0.5,
        "median_ratio": 4.0,
        "max_ratio": 5.0,
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sentinel_never_synchronises():
    sen = Sentinel()
    p = torch.zeros(1000, device="cuda", requires_grad=True)
    p.grad = torch.full_like(p, 2.0)
    torch.cuda.synchronize()
    got = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(5):
            sen.push(step, "loss", torch.tensor(float(step), device="cuda") * 1.0)
            sen.push_grad_norm(step, [p])
            got += sen.poll()  # whatever has landed; never waits
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    got += sen.poll()
    assert sorted((s, n) for s, n, _ in got) == sorted((s, n) for s in range(5) for n in ("loss", "grad_norm"))
    for s, n, v in got:
        assert v == pytest.approx(float(s) if n == "loss" else 2.0 * math.sqrt(1000))


def test_a_loss_spike_makes_the_next_steps_collected_in_a_real_loop():
    import gradscope

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with gradscope.watch(model, optimizer=opt) as scope:
        for step in range(60):
            opt.zero_grad()
            scale = 100.0 if step == 33 else 1.0  # one batch with targets 100x off: the loss jumps
            loss = (model(x) - scale * y).pow(2).mean()
            loss.backward()
            opt.step()
            scope.step(loss)
    collected = [r.step for r in scope.history.records]
    bursts = scope.history.sentinel.bursts
    assert bursts[0][0] == 34 and ("loss" in bursts[0][1] or "grad_norm" in bursts[0][1])
    # dense start, every 10th, and the 8 steps after the spike (a burst may be extended, never cut short)
    assert collected[:18] == [*range(16), 20, 30] and set(range(34, 42)) <= set(collected)
    in_bursts = {s for first, _ in bursts for s in range(first, first + 2 * BURST)}
    assert set(collected) <= {*range(16), 20, 30, 40, 50} | in_bursts
    norms = dict(scope.history.sentinel.grad_norms)
    assert set(collected) <= set(norms)  # every collected step, and the sentinel's steps between them


def test_cpu_gradient_norm_cadence_follows_its_cost_and_the_probe_fills_the_gaps():
    from gradscope.stats import sentinel as S

    c = S._Cadence()
    c.step_time = 0.010  # a 10 ms step
    c.spent(0.0001)  # a 0.1 ms norm: 1 % of the step, twice the share allowed
    assert c.every == math.ceil(0.0001 / (S.CPU_SHARE * 0.010)) == 2
    c.spent(0.5)
    assert c.every == S.CPU_MAX_EVERY  # never more than this many steps without a full reading

    sen = Sentinel()
    a, b = torch.zeros(4, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.ones(4), torch.ones(2)
    cad = sen._cadence["grad_norm"] = S._Cadence(every=4)
    cad.due = lambda step: step % 4 == 0  # type: ignore[method-assign]  (no wall-clock in a test)
    for step in range(6):
        if step == 5:
            b.grad[0] = math.nan
        sen.push_grad_norm(step, [a, b], probe=[b])
    got = sen.poll()
    assert [(s, n) for s, n, _ in got] == [
        (0, "grad_norm"), (1, "grad_norm:probe"), (2, "grad_norm:probe"), (3, "grad_norm:probe"),
        (4, "grad_norm"), (5, "grad_norm:probe"),
    ]
    assert math.isnan(got[-1][2])


def test_sentinel_log_says_since_when_a_gap_hides_the_start():
    log = SentinelLog()
    for s, v in [(0, 1.0), (4, 1.0), (8, math.nan)]:
        log.add(s, "grad_norm", v)
    assert log.first_nonfinite["grad_norm"] == 8 and log.not_before["grad_norm"] == 5


def test_departures_date_where_a_blow_up_began():
    from gradscope.schedule import departures

    losses = [(s, 1.0 - 0.01 * s + 0.02 * (s % 2)) for s in range(40)]
    losses += [(40, 3.0), (41, 30.0), (42, 300.0), (43, math.inf), (44, math.nan)]
    found = departures(losses)
    assert found[0] == 40 and 43 in found and 44 not in found  # NaN after Inf is not a new departure
    assert departures([(s, 1.0) for s in range(5)] + [(5, 50.0)]) == []  # too few values to judge a range
