"""Bounded memory on collected steps: the reductions and the update probe never copy a whole tensor.

Peak memory is the process's resident high-water mark (VmHWM), reset right before the measured call
through /proc/self/clear_refs; the bound is the issue's: max(64 MB, 5 % of the tensor). Exactness of
the update measurement is checked against a plain copy made in the test.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from gradscope.stats import params as P
from gradscope.stats import reductions as R

MB = 1 << 20
SLACK = 8 * MB  # the interpreter's own noise around a call


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_above_now(fn) -> int:
    """Bytes of resident memory fn() added at its peak, above the resident memory before it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the resident high-water mark here")
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def _bound(t: torch.Tensor) -> int:
    return max(64 * MB, t.numel() * t.element_size() // 20)


@pytest.fixture(scope="module")
def big_bf16():
    # An LM head's logits in bf16, 4 x 256 x 50,257 (103 MB): an fp32 copy alone would be 206 MB, the old
    # sign temporary as much again. One torch thread: thousands of small ops each ending in a barrier
    # crawl when the CI machine is loaded (the library does not change the user's thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.empty(4, 256, 50257, dtype=torch.bfloat16)
    x.normal_()
    yield x
    torch.set_num_threads(threads)


def test_activation_and_gradient_reductions_stay_within_the_bound(big_bf16):
    x = big_bf16
    bound = _bound(x) + SLACK
    R.activation_stats(x[:1, :1], band=(-1.0, 1.0), count_neg=True)  # reused buffers made before measuring
    assert _peak_above_now(lambda: R.activation_stats(x, band=(-1.0, 1.0), count_neg=True)) < bound
    assert _peak_above_now(lambda: R.activation_stats(x, band=None, count_neg=True, unit_dim=2)) < bound
    assert _peak_above_now(lambda: R.grad_stats(x, unit_dim=1)) < bound
    assert _peak_above_now(lambda: R.unit_absmax(x, 2)) < bound
    assert _peak_above_now(lambda: R.norm_input_stats(x)) < bound
    assert _peak_above_now(lambda: R.strided_sample(x.transpose(0, 2))) < bound


def test_parameter_norms_stay_within_the_bound(big_bf16):
    p = nn.Parameter(big_bf16.view(-1, 50257), requires_grad=False)
    assert _peak_above_now(lambda: P._sq_norms([p])) < 64 * MB + SLACK
    sq = P._sq_norms([p])
    assert sq.item() == pytest.approx(float(p.detach().double().pow(2).sum()), rel=1e-5)


def _true_update_sq(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {n: float((before[n] - p.detach()).double().pow(2).sum()) for n, p in model.named_parameters()}


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),  # every parameter in one fused call
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
])  # fmt: skip
def test_update_probe_is_exact_and_rotates_over_budget(make_opt):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    opt = make_opt(model.parameters())
    named = list(model.named_parameters())
    x = torch.randn(8, 64)
    weight_bytes = 64 * 64 * 4
    budget = 2 * weight_bytes + 2 * 64 * 4  # two layers per step, of six
    measured: dict[str, int] = {}
    for _ in range(5):
        _train_step(model, x)
        probe = P.UpdateProbe(named, budget=budget)
        assert probe.nbytes <= budget
        assert 0 < len(probe.names) < len(named) and probe.skipped == len(named) - len(probe.names)
        # the reference: a full copy, made the plain way; the probe's own copy is already taken
        state = {n: p.detach().clone() for n, p in named}
        opt.step()
        names, sq = probe.finish()
        for n, v in zip(names, sq.tolist(), strict=True):
            true = float((state[n] - dict(named)[n].detach()).double().pow(2).sum())
            assert v == pytest.approx(true, rel=1e-5, abs=1e-30)
            measured[n] = measured.get(n, 0) + 1
    assert set(measured) == {n for n, _ in named}  # every parameter measured exactly, in turn
    # under the budget, one probe measures everything
    _train_step(model, x)
    probe = P.UpdateProbe(named)
    opt.step()
    names, sq = probe.finish()
    assert names == [n for n, _ in named] and bool(torch.all(sq > 0))


def test_update_probe_memory_is_bounded():
    # 3 x 48 MB of fp32 parameters: a full copy would be 144 MB, the budget is 64 MB
    params = [nn.Parameter(torch.randn(12 * MB // 4, 4)) for _ in range(3)]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.SGD(params, lr=0.5)
    probes: list[P.UpdateProbe] = []
    assert _peak_above_now(lambda: probes.append(P.UpdateProbe(named))) < P.BUDGET_FLOOR + SLACK
    opt.step()
    names, sq = probes[0].finish()
    assert len(names) == 1  # one 48 MB parameter fits the 64 MB budget
    assert sq.item() == pytest.approx(0.25 * params[0].numel(), rel=1e-6)
