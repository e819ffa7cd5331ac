"""Mixed precision: gradients reported unscaled, GradScaler's skipped steps counted, fp16/bf16 models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(dtype)


def _batches(n: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, generator=g).to(dtype) for _ in range(n)]


def test_scaled_gradients_are_reported_unscaled():
    ref_model = _model()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    with gradscope.watch(ref_model, optimizer=ref_opt, every=1) as ref:
        for x in _batches(2):
            ref_opt.zero_grad()
            ref_model(x).pow(2).mean().backward()
            ref_opt.step()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with gradscope.watch(model, optimizer=opt, every=1, scaler=scaler) as scope:
        for x in _batches(2):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
    got, want = scope.history.last, ref.history.last
    for name in want.gradients:
        assert got.gradients[name].norm == pytest.approx(want.gradients[name].norm, rel=1e-5)
        assert got.gradients[name].absmax == pytest.approx(want.gradients[name].absmax, rel=1e-5)
    for name in want.params:
        assert got.params[name].grad_norm == pytest.approx(want.params[name].grad_norm, rel=1e-5)
    assert scope.history.steps_seen == 2 and scope.history.skipped_total == 0
    assert "update" not in scaler.__dict__  # close() restored the scaler


def test_steps_the_scaler_skips_are_counted_not_lost():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with gradscope.watch(model, optimizer=opt, every=1, scaler=scaler) as scope:
        for i, x in enumerate(_batches(5)):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            if i == 2:
                loss = loss * float("inf")  # an overflow: the scaler skips this optimizer step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scope.step(loss)
        report = scope.report()
    assert scope.history.steps_seen == 5
    assert scope.history.skipped_steps == [2]
    skipped = [r for r in scope.history.records if r.skipped]
    assert [r.step for r in skipped] == [2]
    assert skipped[0].params["0.weight"].update_norm is None  # the optimizer never ran
    # one overflow the scaler handled is not above info
    assert all(f.severity == "info" for f in report.findings if f.kind == "nonfinite")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_measured_in_fp32(dtype):
    model = _model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt, every=1) as scope:
        for x in _batches(2, dtype):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
    rec = scope.history.last
    assert rec.activations["0"].numel == 4 * 16
    assert isinstance(rec.activations["0"].rms, float) and rec.activations["0"].rms > 0
    assert all(p.grad_norm is not None and p.grad_norm > 0 for p in rec.params.values())
    assert all(p.update_norm is not None and p.update_norm > 0 for p in rec.params.values())
    assert scope.history.params["0.weight"].dtype == str(dtype).replace("torch.", "")
