"""Odd but real models and loops: each runs bit-identically under watch() and is measured where it can be."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import gradscope


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def _train(make, batches, watched: bool, every: int | None = 1, between=None):
    """Train make()'s model on batches; ``between(model, step)`` runs after each step (evaluations)."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.watch(model, optimizer=opt, every=every) if watched else None
    losses = []
    for i, x in enumerate(batches):
        if hasattr(model, "before_step"):
            model.before_step(i)
        opt.zero_grad()
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
        if between is not None:
            between(model, i)
    weights = [p.detach().clone() for p in model.parameters()]
    report = None
    if scope is not None:
        report = scope.report()
        scope.close()
    return losses + weights, scope, report


class MoE(nn.Module):
    """Top-1 routing by the sign of the first feature: expert 1 gets no tokens when every x0 > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        route = (x[:, 0] < 0).long()
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            idx = (route == e).nonzero(as_tuple=True)[0]
            y = y.index_add(0, idx, expert(h[idx]))  # a (0, 8) input when the expert has no tokens
        return self.out(y)


def test_an_expert_with_no_tokens():
    g = torch.Generator().manual_seed(3)
    batches = []
    for i in range(6):
        x = torch.randn(8, 4, generator=g)
        if i % 2 == 1:
            x[:, 0] = x[:, 0].abs() + 0.1  # nobody routed to expert 1
        batches.append(x)
    plain, _, _ = _train(MoE, batches, watched=False)
    seen, scope, report = _train(MoE, batches, watched=True)
    _same(plain, seen)
    records = {r.step: r for r in scope.history.records}
    tokens_1 = [int((x[:, 0] < 0).sum()) for x in batches]
    for step, rec in records.items():
        if tokens_1[step] == 0:
            assert "experts.1.0" not in rec.activations  # nothing to measure: not a dead expert
        else:
            assert rec.activations["experts.1.0"].numel == tokens_1[step] * 8
    assert not [f for f in report.findings if f.layer.startswith("experts.1") and f.severity != "info"]


class Sometimes(nn.Module):
    """An auxiliary head that runs on even steps only."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.aux = nn.Linear(8, 1)
        self.head = nn.Linear(8, 1)
        self.use_aux = True

    def before_step(self, step: int) -> None:
        self.use_aux = step % 2 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        out = self.head(h)
        return out + self.aux(h) if self.use_aux else out


def test_a_module_that_runs_only_on_some_steps():
    batches = [torch.randn(8, 4) for _ in range(6)]
    plain, _, _ = _train(Sometimes, batches, watched=False)
    seen, scope, report = _train(Sometimes, batches, watched=True)
    _same(plain, seen)
    for rec in scope.history.records:
        assert ("aux" in rec.activations) == (rec.step % 2 == 0)
        assert (rec.params["aux.weight"].grad_norm is not None) == (rec.step % 2 == 0)
    assert not [f for f in report.findings if f.kind == "unused_parameter"]


class Mixed(nn.Module):
    """Returns a float tensor, its argmax (int), a mask (bool) and an empty slice together."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor):
        h = self.fc(x)
        return h, h.argmax(-1), h > 0, h[:, :0]


class UsesMixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixed = Mixed()
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, idx, mask, empty = self.mixed(x)
        return self.head(h * mask) + idx.float().mean() + empty.sum()


def test_a_module_returning_float_int_bool_and_empty_together():
    batches = [torch.randn(5, 4) for _ in range(3)]
    plain, _, _ = _train(UsesMixed, batches, watched=False)
    seen, scope, _ = _train(UsesMixed, batches, watched=True)
    _same(plain, seen)
    rec = scope.history.last
    assert rec.activations["mixed"].numel == 5 * 6  # the float output only
    assert rec.activations["mixed"].calls == 1
    assert rec.gradients["mixed"].norm > 0


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def before_step(self, step: int) -> None:
        self.b.requires_grad_(not 2 <= step < 5)  # frozen for steps 2, 3, 4, then trained again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)))


def test_a_block_frozen_mid_run_and_unfrozen_again():
    batches = [torch.randn(8, 4) for _ in range(7)]
    plain, _, _ = _train(Blocks, batches, watched=False)
    seen, scope, report = _train(Blocks, batches, watched=True)
    _same(plain, seen)
    for rec in scope.history.records:
        frozen = 2 <= rec.step < 5
        assert rec.params["b.0.weight"].frozen is frozen
        assert (rec.params["b.0.weight"].grad_norm is None) is frozen
        assert rec.params["a.0.weight"].grad_norm is not None  # gradients still flow through b to a
    assert scope.history.ever_frozen == {"b.0.weight", "b.0.bias"}
    assert not [f for f in report.findings if f.kind == "unused_parameter"]


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


EVALS = {
    "inference_mode": lambda: torch.inference_mode(),
    "no_grad": lambda: torch.no_grad(),
    "grad_enabled": lambda: torch.enable_grad(),
}


@pytest.mark.parametrize("order", list(itertools.permutations(EVALS)))
def test_evaluations_in_any_mode_and_order(order):
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(16, 4, generator=g) for _ in range(4)]
    evals = [torch.randn(16, 4, generator=g) for _ in range(3)]
    outputs: list[torch.Tensor] = []

    def evaluate(model: nn.Module, step: int) -> None:
        model.eval()
        for mode, x in zip(order, evals, strict=True):
            with EVALS[mode]():
                outputs.append(model(x).detach().clone())
        model.train()

    plain, _, _ = _train(_bn_model, batches, watched=False, between=evaluate)
    plain_outputs, outputs[:] = list(outputs), []
    seen, scope, _ = _train(_bn_model, batches, watched=True, between=evaluate)
    _same(plain, seen)
    _same(plain_outputs, outputs)
    ev = scope.history.last.eval_norms["1"]
    assert not ev.training and ev.calls == 3
    assert all(r.norms["1"].calls == 1 for r in scope.history.records)  # training forwards only


def test_batchnorm_evaluated_one_sample_at_a_time_with_grad_enabled_is_not_training():
    torch.manual_seed(0)
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(6)
    with gradscope.watch(model, optimizer=opt) as scope:  # default settings
        for step in range(60):
            opt.zero_grad()
            model(torch.randn(32, 4, generator=g)).pow(2).mean().backward()
            opt.step()
            if step % 20 == 19:
                model.eval()  # grad stays enabled: one sample at a time, as a per-example evaluation does
                for _ in range(4):
                    model(torch.randn(1, 4, generator=g))
                model.train()
        report = scope.report()
    assert all(r.norms["1"].training for r in scope.history.records if "1" in r.norms)
    assert any(r.eval_norms for r in scope.history.records)
    assert not [f for f in report.findings if f.kind == "normalization_drift" and f.severity != "info"]


class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm: a user-written norm with an optional bias."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_user_written_norms_are_norms_and_shrinkage_is_not_relu():
    from gradscope.hooks import selection

    model = nn.Sequential(
        nn.Linear(8, 8),
        NanoLayerNorm(8, bias=False),
        nn.Hardshrink(),
        LlamaRMSNorm(8),
        nn.Softshrink(),
        nn.Linear(8, 1),
    )
    assert [selection.role_of(m) for m in model] == ["linear", "norm", "other", "norm", "other", "linear"]
    with gradscope.watch(model, every=1) as scope:
        model(torch.randn(16, 8)).sum().backward()
        scope.step()
    rec = scope.history.last
    assert {"1", "3"} <= rec.norms.keys()
    assert rec.norms["1"].weight_rms == pytest.approx(1.0)
    with torch.no_grad():
        model[3].weight[2] = 1e-4  # one collapsed channel of the RMSNorm gain
    with gradscope.watch(model, every=1) as scope:
        model(torch.randn(16, 8)).sum().backward()
        scope.step()
    norm = scope.history.last.norms["3"]
    assert norm.weight_absmin == pytest.approx(1e-4) and norm.weight_absmax == pytest.approx(1.0)
    assert rec.activations["2"].alive is None  # no dead-unit claim on a function that passes negatives


def test_per_unit_maxima_of_weighted_layers_and_masks_per_width():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.fc2 = nn.Linear(8, 4)
            self.act = nn.ReLU()  # one module applied at two widths

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc2(self.act(self.fc1(x))))

    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(10, 6)
    with gradscope.watch(model, every=1) as scope:
        model(x).pow(2).sum().backward()
        scope.step()
    rec = scope.history.last
    # ground truth in plain torch
    h1 = model.fc1(x)
    h1.retain_grad()
    h2 = model.fc2(torch.relu(h1))
    h2.retain_grad()
    torch.relu(h2).pow(2).sum().backward()
    assert rec.activations["fc1"].unit_max.tolist() == pytest.approx(h1.detach().amax(0).tolist())
    assert rec.gradients["fc1"].unit_absmax.tolist() == pytest.approx(h1.grad.abs().amax(0).tolist())
    assert rec.gradients["fc2"].unit_absmax.tolist() == pytest.approx(h2.grad.abs().amax(0).tolist())
    widths = rec.activations["act"].alive_by_width
    assert rec.activations["act"].alive is None and set(widths) == {8, 4}
    assert widths[8].tolist() == (torch.relu(h1) > 0).any(0).tolist()
    assert widths[4].tolist() == (torch.relu(h2) > 0).any(0).tolist()


def test_every_kind_of_output_tensor_is_handled_on_purpose():
    """Sparse, nested, complex, integer, bool, empty, quantized and meta outputs are each skipped with a
    reason; floating and inference-mode outputs are measured; none of them breaks the forward."""
    import warnings

    from gradscope.hooks import selection

    dense = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype/deprecation notes for nested and quantized
        nested = torch.nested.nested_tensor([torch.randn(2, 6), torch.randn(3, 6)])
        quantized = torch.quantize_per_tensor(dense, 0.1, 0, torch.quint8)
    with torch.inference_mode():
        inference = torch.randn(4, 6)
    kinds = {
        "sparse": dense.to_sparse(),
        "nested": nested,
        "complex": torch.randn(4, 6, dtype=torch.cfloat),
        "integer or bool": torch.ones(4, 6, dtype=torch.bool),
        "empty": torch.randn(0, 6),
        "quantized": quantized,
        "meta": torch.empty(4, 6, device="meta"),
    }
    for kind, t in kinds.items():
        assert selection.skip_reason(t).startswith(kind + ":"), kind
    assert selection.skip_reason(dense) is None and selection.skip_reason(inference) is None

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor):
            return self.fc(x), *kinds.values(), inference

    model = Odd()
    with gradscope.watch(model, every=1) as scope:
        out = model(dense)
        out[0].sum().backward()
        scope.step()
    rec = scope.history.last
    assert rec.activations[""].numel == 2 * 4 * 6  # fc's output and the inference-mode tensor
    assert rec.gradients["fc"].norm > 0
