"""torch.compile: watching then compiling works with the same numbers; watching a compiled model refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope.errors import GradscopeWarning, UsageError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def _train(model, call, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, optimizer=opt, every=1)
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        loss = call(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    scope.close()
    return losses, scope.history.last


# Dynamo itself touches .grad of non-leaf tensors while it breaks the graph around a hook (not ours to fix).
_DYNAMO_NOISE = "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # compiled-code caches are process-wide: each test starts from none
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings(_DYNAMO_NOISE)
def test_watch_then_compile_gives_the_eager_statistics():
    eager_model = _model()
    eager_losses, eager = _train(eager_model, eager_model)
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    losses, rec = _train(model, compiled)
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    assert rec.activations.keys() == eager.activations.keys() == {"0", "1", "2"}
    assert rec.gradients.keys() == eager.gradients.keys()
    for name in eager.activations:
        assert rec.activations[name].rms == pytest.approx(eager.activations[name].rms, rel=1e-5)
        assert rec.gradients[name].norm == pytest.approx(eager.gradients[name].norm, rel=1e-5)
    for name in eager.params:
        assert rec.params[name].update_norm == pytest.approx(eager.params[name].update_norm, rel=1e-5)


def test_watching_an_already_compiled_model_refuses_clearly():
    compiled = torch.compile(_model(), backend="aot_eager")
    with pytest.raises(UsageError, match=r"already compiled by torch\.compile"):
        gradscope.watch(compiled)


@pytest.mark.filterwarnings(_DYNAMO_NOISE)
def test_a_graph_compiled_before_watch_is_not_silent():
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(torch.randn(4, 8)).sum().backward()  # traced before gradscope's hooks existed
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer=opt, every=1), pytest.warns(GradscopeWarning, match="no forward pass"):
        loss = compiled(torch.randn(4, 8)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
