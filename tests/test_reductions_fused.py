"""The fused one-pass reductions against plain numpy/torch references.

Every statistic is checked on tensors large enough to be walked in several pieces, on non-contiguous
views, in bf16/fp16/fp64, with NaN/Inf, and on empty tensors. The CPU's branch-free sign counts and the
exact counts that run on accelerators (and on the CPU once a non-finite value shows up) are both checked,
the latter by running that same code on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradscope.stats import reductions as R

BAND = (-0.9747, 0.9747)


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    """Pieces of 4,096 elements: every path through several pieces on tensors small enough to be quick."""
    monkeypatch.setattr(R, "CHUNK", 4096)
    R._local.__dict__.clear()
    yield
    R._local.__dict__.clear()


def _ref_activation(x: torch.Tensor, band, count_neg: bool) -> dict[str, float]:
    a = x.detach().double().numpy().reshape(-1)  # bf16/fp16 values are exact in float64
    with np.errstate(invalid="ignore", over="ignore"):
        out = {
            "sum": float(a.sum()),
            "sumsq": float((a * a).sum()),
            "nonzero": float(np.count_nonzero(a)),
            "nonfinite": float((~np.isfinite(a)).sum()),
        }
        if count_neg:
            out["neg"] = float((a < 0).sum())
        if band is not None:
            mid, half = (band[0] + band[1]) / 2, (band[1] - band[0]) / 2
            # the same comparison, in the dtype the reduction uses (fp32 for half inputs)
            p = x.detach().double() if x.dtype == torch.float64 else x.detach().float()
            out["saturated"] = float(((p - mid).abs() >= half).sum())
    return out


def _check(x: torch.Tensor, band, count_neg: bool, unit_dim=None) -> None:
    res = R.activation_stats(x, band=band, count_neg=count_neg, unit_dim=unit_dim)
    sums, maxes = res[0], res[1]
    assert sums.dtype == torch.float32 and maxes.dtype == torch.float32
    slots = R.act_sum_slots(count_neg=count_neg, band=band is not None)
    got = dict(zip(slots, sums.tolist(), strict=True))
    ref = _ref_activation(x, band, count_neg)
    for key in ("nonzero", "nonfinite", "neg", "saturated"):
        if key in ref:
            assert got[key] == ref[key], key
    for key in ("sum", "sumsq"):
        if math.isfinite(ref[key]):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-3), key
        else:
            assert not math.isfinite(got[key]), key
    flat = x.detach().double().reshape(-1)
    if torch.isnan(flat).any():
        assert math.isnan(maxes[0]) and math.isnan(maxes[1])
    else:
        assert maxes.tolist() == [float(flat.max().float()), float(-flat.min().float())]  # fp32 slots
    if unit_dim is not None:
        dims = [d for d in range(x.dim()) if d != unit_dim % x.dim()]
        expected = x.detach().double().amax(dim=dims).float()
        torch.testing.assert_close(res[2], expected, rtol=0, atol=0, equal_nan=True)


def _relu_like(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.relu(torch.randn(*shape)).to(dtype)


CASES = [
    ("small", lambda: torch.randn(32, 64)),
    ("several pieces", lambda: torch.randn(3, R.CHUNK // 2 + 17)),
    ("conv-shaped, transposed", lambda: torch.randn(3, 8, 30, 40).transpose(1, 3)),
    ("strided slice", lambda: torch.randn(200, 300)[::2, 3:]),
    ("1-D odd length", lambda: torch.randn(R.CHUNK * 2 + 5)),
    ("bf16", lambda: (torch.randn(5, 32, 300) * 3).bfloat16()),
    ("fp16", lambda: (torch.randn(100, 300) * 3).half()),
    ("fp64", lambda: torch.randn(40, 50, dtype=torch.float64)),
    ("relu zeros", lambda: _relu_like(4, 32, 300)),
    ("zero-dim", lambda: torch.tensor(0.5)),
]


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("exact", [False, True], ids=["cpu-signs", "exact-counts"])
def test_activation_stats_match_reference(name, make, exact, monkeypatch):
    if exact:  # the accelerator path (no host reads), run on the CPU
        monkeypatch.setattr(R, "_host_reads_free", lambda t: False)
    torch.manual_seed(0)
    x = make()
    for band in (None, BAND):
        for count_neg in (True, False):
            _check(x, band, count_neg)


@pytest.mark.parametrize("exact", [False, True], ids=["cpu-signs", "exact-counts"])
def test_nan_and_inf_counted_exactly(exact, monkeypatch):
    if exact:
        monkeypatch.setattr(R, "_host_reads_free", lambda t: False)
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, R.CHUNK // 2).to(dtype)
        x[0, :3] = float("nan")
        x[1, 5] = float("inf")
        x[3, -1] = -float("inf")
        x[2, :100] = 0.0
        _check(x, BAND, True)
        _check(x, None, False)
        inf_only = torch.randn(1000).to(dtype)
        inf_only[7] = -float("inf")
        _check(inf_only, BAND, True)
        sums, maxes = R.grad_stats(x)
        assert sums[1].item() == 5.0 and math.isnan(maxes[0]) and math.isnan(sums[0])
        sums, maxes = R.grad_stats(inf_only)
        assert sums[1].item() == 1.0 and maxes[1].item() == math.inf


@pytest.mark.parametrize("exact", [False, True], ids=["cpu-signs", "exact-counts"])
def test_per_unit_extremes_fused(exact, monkeypatch):
    if exact:
        monkeypatch.setattr(R, "_host_reads_free", lambda t: False)
    torch.manual_seed(2)
    conv = torch.randn(4, 16, 20, 20)  # several pieces, units on dim 1
    _check(conv, None, True, unit_dim=1)
    _check(conv.bfloat16(), BAND, True, unit_dim=1)
    lin = torch.randn(3, 50, 200).transpose(0, 1)  # non-contiguous, units last
    _check(lin, None, True, unit_dim=-1)
    _check(_relu_like(200, 128), None, False, unit_dim=1)
    # the |value| variant equals the plain unit_absmax, and so does the gradient's
    _, _, units = R.activation_stats(lin, band=None, count_neg=True, unit_dim=2, unit_abs=True)
    expected = lin.abs().amax(dim=(0, 1))
    torch.testing.assert_close(units, expected, rtol=0, atol=0)
    torch.testing.assert_close(R.unit_absmax(lin, 2), expected, rtol=0, atol=0)
    sums, maxes, gunits = R.grad_stats(lin, 2)
    torch.testing.assert_close(gunits, expected, rtol=0, atol=0)
    assert sums[0].item() == pytest.approx(float(lin.double().pow(2).sum()), rel=1e-5)
    assert maxes.tolist() == [lin.max().item(), -lin.min().item()]
    relu = _relu_like(64, 300)
    torch.testing.assert_close(R.unit_absmax(relu, 1, nonnegative=True), relu.amax(0), rtol=0, atol=0)


def test_grad_stats_match_reference():
    torch.manual_seed(3)
    for g in (torch.randn(R.CHUNK + 3), torch.randn(20, 30, 40).permute(2, 0, 1), torch.randn(9, 9).half()):
        sums, maxes = R.grad_stats(g)
        d = g.double()
        assert sums[0].item() == pytest.approx(float(d.pow(2).sum()), rel=1e-5)
        assert sums[1].item() == 0.0
        assert maxes.tolist() == [float(d.max()), -float(d.min())]


def test_empty_tensors_give_neutral_values():
    for x in (torch.zeros(0, 16), torch.zeros(4, 0), torch.zeros(0), torch.zeros(2, 0, 3).bfloat16()):
        sums, maxes = R.activation_stats(x, band=BAND, count_neg=True)
        assert sums.tolist() == [0.0] * 6
        assert maxes.tolist() == [-math.inf, -math.inf]  # the identity of max: combining changes nothing
        gs, gm = R.grad_stats(x)
        assert gs.tolist() == [0.0, 0.0] and gm.tolist() == [-math.inf, -math.inf]
        if x.dim() >= 2:
            _, _, units = R.activation_stats(x, band=None, count_neg=False, unit_dim=1)
            assert units.shape == (x.shape[1],)
            assert R.grad_stats(x, 1)[2].shape == (x.shape[1],)
            assert R.unit_absmax(x, 1).shape == (x.shape[1],)
        assert R.strided_sample(x).numel() == 0
    sumsq, mean, var = R.norm_input_stats(torch.zeros(0, 5, 3))
    assert sumsq.item() == 0.0 and mean.shape == (5,) and var.shape == (5,)


def test_pieces_cover_every_element_once():
    x = torch.arange(6 * 40 * 50 * 60, dtype=torch.float32).view(6, 40, 50, 60)
    for view, keep in ((x, None), (x.transpose(1, 3), None), (x.transpose(1, 3), 1), (x[:, ::2], 3)):
        parts = R.pieces(view, limit=5000, keep=keep)
        assert all(p.numel() <= max(5000, view.shape[keep] if keep is not None else 0) for p in parts)
        if keep is not None:
            assert all(p.shape[keep] == view.shape[keep] for p in parts)
        got = torch.cat([p.reshape(-1) for p in parts]).sort().values
        torch.testing.assert_close(got, view.reshape(-1).sort().values, rtol=0, atol=0)


def test_strided_sample_of_a_non_contiguous_tensor():
    x = torch.randn(30, 40, 50)
    t = x.transpose(0, 2)
    torch.testing.assert_close(R.strided_sample(t), t.reshape(-1)[:: t.numel() // 1024][:1024])
    torch.testing.assert_close(R.strided_sample(x), x.reshape(-1)[:: x.numel() // 1024][:1024])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_input_stats_match_reference(dtype):
    torch.manual_seed(4)
    # a large mean next to a small spread: E[x^2] - E[x]^2 in fp32 would lose the variance entirely
    x = (torch.randn(8, 12, 20, 20) * 0.01 + 1000.0).to(dtype)
    sumsq, mean, var = R.norm_input_stats(x)
    d = x.double()
    torch.testing.assert_close(mean, d.mean(dim=(0, 2, 3)).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(var, d.var(dim=(0, 2, 3), unbiased=False).float(), rtol=1e-4, atol=1e-12)
    assert sumsq.item() == pytest.approx(float(d.pow(2).sum()), rel=1e-5)
    m2, v2 = R.channel_stats(torch.randn(64, 12).transpose(0, 1).contiguous().t())
    assert m2.shape == (12,) and v2.shape == (12,)


def test_inference_mode_then_normal_mode():
    """Reused buffers made under inference_mode must stay writable outside it (and the other way round)."""
    R._local.__dict__.clear()
    x = torch.randn(64, 32).bfloat16()
    with torch.inference_mode():
        inner = R.activation_stats(x, band=BAND, count_neg=True)
    outer = R.activation_stats(x, band=BAND, count_neg=True)
    with torch.inference_mode():
        y = torch.randn(64, 32).bfloat16()
    again = R.activation_stats(y, band=BAND, count_neg=True)
    torch.testing.assert_close(inner[0], outer[0])
    assert again[0].shape == outer[0].shape
