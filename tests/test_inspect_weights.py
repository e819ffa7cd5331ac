"""Weight-only analysis: reductions against brute force, each rule on real tensors with the real problem,
and a zoo of healthy models (fresh and trained) that must raise nothing above info."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradscope import Thresholds
from gradscope.checkpoint import rules
from gradscope.checkpoint.weights import spectral_norm, split_name, tensor_stats


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run as fast on one thread, and on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def analyze(state: dict[str, torch.Tensor], meta: dict | None = None, roles: dict | None = None):
    stats = [tensor_stats(k, v) for k, v in state.items()]
    return rules.analyze(stats, Thresholds(), meta or {}, roles)


def serious(findings):
    return [(f.kind, f.severity, f.layer) for f in findings if f.severity != "info"]


# --- reductions ---------------------------------------------------------------------------------------


def test_stats_match_brute_force():
    w = torch.randn(37, 23)
    w[3] = 0.0  # one row of exact zeros
    w[5, :4] = 0.0
    s = tensor_stats("enc.0.fc.weight", w)
    flat = [float(v) for v in w.flatten()]
    assert (s.layer, s.leaf) == ("enc.0.fc", "weight")
    assert s.rms == pytest.approx(math.sqrt(sum(v * v for v in flat) / len(flat)), rel=1e-6)
    assert s.absmax == pytest.approx(max(abs(v) for v in flat))
    assert s.zero_frac == pytest.approx(sum(v == 0.0 for v in flat) / len(flat))
    assert s.zero_rows.tolist() == [i == 3 for i in range(37)]
    assert s.row_norms[7] == pytest.approx(math.sqrt(sum(float(v) ** 2 for v in w[7])), rel=1e-6)
    # A few power steps give a lower bound; pure noise (no gap between singular values) is the worst case.
    true = float(torch.linalg.matrix_norm(w, ord=2))
    assert 0.85 * true <= s.spectral <= true * (1 + 1e-6)
    assert (s.nan, s.inf) == (0, 0)


def test_stats_count_nonfinite_and_handle_16bit_blocks(monkeypatch):
    from gradscope.checkpoint import weights

    monkeypatch.setattr(weights, "BLOCK_ELEMENTS", 64)  # several blocks, each converted from bf16 on its own
    blocked = torch.randn(40, 16)
    assert weights.spectral_norm(blocked) == pytest.approx(float(torch.linalg.matrix_norm(blocked, ord=2)), rel=0.15)
    w = torch.randn(40, 16).bfloat16()
    w[2, 3] = float("nan")
    w[30, 0] = float("inf")
    w[31, 1] = float("-inf")
    s = tensor_stats("fc.weight", w)
    assert (s.nan, s.inf) == (1, 2)
    assert s.spectral is None and not s.finite
    clean = torch.randn(40, 16).bfloat16()
    c = tensor_stats("fc.weight", clean)
    assert c.rms == pytest.approx(float(clean.float().pow(2).mean().sqrt()), rel=1e-5)


def test_tiny_values_are_not_taken_for_zero_rows():
    w = torch.full((4, 8), 1e-30)  # squares underflow to 0 in float32, the values do not
    w[1] = 0.0
    s = tensor_stats("fc.weight", w)
    assert s.zero_rows.tolist() == [False, True, False, False]
    assert s.zero_frac == pytest.approx(0.25)


def test_spectral_norm_of_a_known_matrix():
    u, _ = torch.linalg.qr(torch.randn(50, 50))
    v, _ = torch.linalg.qr(torch.randn(30, 30))
    sing = torch.tensor([10.0, 2.0, 1.0] + [0.5] * 27)
    w = u[:, :30] @ torch.diag(sing) @ v.T
    assert spectral_norm(w) == pytest.approx(10.0, rel=1e-3)
    assert spectral_norm(w.bfloat16()) == pytest.approx(10.0, rel=2e-2)
    assert spectral_norm(w.double()) == pytest.approx(10.0, rel=1e-3)
    stats = tensor_stats("fc.weight", w)
    assert stats.spectral == pytest.approx(10.0, rel=1e-3)  # the fused pass agrees
    assert spectral_norm(torch.zeros(5, 5)) == 0.0


def test_split_name():
    assert split_name("encoder.layers.3.norm1.running_var") == ("encoder.layers.3.norm1", "running_var")
    assert split_name("weight") == ("", "weight")


# --- rules: each finding on a real tensor with the real problem -----------------------------------------


def mlp_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_nonfinite_weights_are_critical_at_the_module():
    sd = mlp_state()
    sd["2.weight"][5, 7] = float("nan")
    sd["2.bias"][0] = float("inf")
    [f] = [f for f in analyze(sd) if f.kind == "nonfinite"]
    assert (f.severity, f.layer, f.step) == ("critical", "2", None)
    assert f.evidence["nan"] == 1 and f.evidence["inf"] == 1
    assert "weight, bias" in f.evidence["tensors"]


def bn_state(**changes) -> dict[str, torch.Tensor]:
    bn = nn.BatchNorm1d(8)
    sd = {f"bn.{k}": v.clone() for k, v in bn.state_dict().items()}
    sd["bn.num_batches_tracked"] = torch.tensor(500)
    for key, value in changes.items():
        sd[f"bn.{key}"] = value
    return sd


@pytest.mark.parametrize(("change", "severity", "evidence"), [
    ({"running_var": torch.tensor([1.0] * 6 + [1e-9, 0.0])}, "warning", "near_zero_var_channels"),
    ({"running_var": torch.tensor([1.0] * 7 + [1e9])}, "warning", "huge_var_channels"),
    ({"running_mean": torch.tensor([0.0] * 7 + [500.0])}, "warning", "far_mean_channels"),
    ({"running_var": torch.tensor([1.0] * 7 + [-0.5])}, "critical", "negative_var_channels"),
    ({"weight": torch.full((8,), 1e-5)}, "warning", "gain_rms"),
    ({"weight": torch.full((8,), 1e4)}, "warning", "gain_rms"),
])
def test_batchnorm_drift(change, severity, evidence):
    [f] = analyze(bn_state(**change))
    assert (f.kind, f.severity, f.layer) == ("normalization_drift", severity, "bn")
    assert evidence in f.evidence


def test_zero_gain_is_info_in_a_fresh_zero_init_residual_and_warning_after_training():
    fresh = bn_state(weight=torch.zeros(8), num_batches_tracked=torch.tensor(0))
    assert [(f.kind, f.severity) for f in analyze(fresh)] == [("normalization_drift", "info")]
    trained = bn_state(weight=torch.zeros(8))
    assert [(f.kind, f.severity) for f in analyze(trained)] == [("normalization_drift", "warning")]


def test_layernorm_gain_collapse_by_name_and_by_model_role():
    sd = {"blocks.0.ln_1.weight": torch.full((16,), 3e-4), "blocks.0.ln_1.bias": torch.zeros(16)}
    [f] = analyze(sd)
    assert (f.kind, f.severity, f.layer) == ("normalization_drift", "warning", "blocks.0.ln_1")
    assert "collapsed" in f.message
    unnamed = {"blocks.0.scale.weight": torch.full((16,), 3e-4)}
    assert analyze(unnamed) == []  # a 1-D weight is not taken for a norm gain by shape alone...
    [g] = analyze(unnamed, roles={"blocks.0.scale": "norm"})  # ...but the model can say it is one
    assert g.kind == "normalization_drift"


def test_dead_units_from_zero_rows_and_hopeless_biases():
    sd = mlp_state()
    sd["0.weight"][:40] = 0.0  # 40 of 64 units: zero weights and bias <= 0 output ReLU(b) = 0
    sd["0.bias"][:40] = -torch.rand(40)
    sd["2.bias"][:3] = -1e4  # |w|·|x| is ~0.6 · 8 for unit-scale inputs: never offsets -1e4
    found = {f.layer: f for f in analyze(sd) if f.kind == "dead_relu"}
    assert found["0"].severity == "warning"
    assert found["0"].evidence["zero_rows"] == 40 and found["0"].evidence["dead_frac"] == pytest.approx(40 / 64)
    assert found["2"].severity == "info"
    assert found["2"].evidence["negative_bias_units"] == 3


def test_a_zero_row_with_positive_bias_is_alive_and_a_padding_row_is_not_a_unit():
    sd = mlp_state()
    sd["0.weight"][:5] = 0.0
    sd["0.bias"][:5] = 0.5  # constant positive output: not dead
    emb = nn.Embedding(100, 16, padding_idx=0)
    sd.update({"tok_emb.weight": emb.weight.detach().clone()})
    assert [f for f in analyze(sd) if f.kind == "dead_relu"] == []


def stack_state(n: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    blocks = nn.ModuleList(nn.Linear(48, 48) for _ in range(n))
    return {f"blocks.{k}": v.detach().clone() for k, v in blocks.state_dict().items()}


def test_sibling_scale_outlier():
    sd = stack_state()
    sd["blocks.3.weight"] *= 500.0
    [f] = analyze(sd)
    assert (f.kind, f.severity, f.layer) == ("weight_outlier", "warning", "blocks.3")
    assert f.evidence["ratio"] == pytest.approx(500.0, rel=0.2)
    assert f.evidence["siblings"] == 5


def test_exact_zero_weight_is_info_unless_the_checkpoint_was_trained():
    sd = stack_state()
    sd["blocks.2.weight"].zero_()
    [f] = analyze(sd)
    assert (f.kind, f.severity, f.layer) == ("weight_outlier", "info", "blocks.2")
    [g] = analyze(sd, meta={"epoch": 7})
    assert g.severity == "warning" and "epoch 7" in g.message


def trained_mlp(frozen: int | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 10))
    params = [p for i, layer in enumerate(m) if i != frozen for p in layer.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(30):
        x = torch.randn(32, 32)
        loss = (m(x) - x[:, :10]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def test_untrained_layer_among_trained_ones():
    sd = trained_mlp(frozen=2).state_dict()
    [f] = analyze(sd)
    assert (f.kind, f.severity, f.layer) == ("weight_outlier", "info", "2")
    assert "looks untrained" in f.message
    [g] = analyze(sd, meta={"optimizer_state": 1})
    assert g.severity == "warning"


# --- healthy zoo ---------------------------------------------------------------------------------------


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32, padding_idx=0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(32)
        self.head = nn.Linear(32, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.enc(self.emb(x))))


class TinyGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.gru = nn.GRU(16, 32, batch_first=True)
        self.out = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(self.emb(x))[0])


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


ZOO = {
    "mlp": (lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
            lambda: torch.randn(16, 32)),
    "cnn": (cnn, lambda: torch.randn(16, 3, 8, 8)),
    "transformer": (TinyTransformer, lambda: torch.randint(1, 100, (8, 12))),
    "gru": (TinyGRU, lambda: torch.randint(0, 50, (8, 12))),
}


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("steps", [0, 40])
def test_healthy_models_raise_nothing(name, steps):
    build, batch = ZOO[name]
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        y = model(batch())
        loss = (y - torch.randn_like(y)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = {"epoch": 3} if steps else {}
    assert serious(analyze(model.state_dict(), meta)) == []
