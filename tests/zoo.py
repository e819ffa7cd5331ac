"""The tests' zoo: the demo's scenarios (gradscope.demo) plus healthy controls only the tests train, and
the tables of which are healthy and which broken. A test helper, not part of the library.

    import zoo
    sc = zoo.build("healthy_cnn")
    with gradscope.watch(sc.model, sc.optimizer, every=1) as scope:
        sc.run(scope)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.demo.data import SyntheticData, _gen, classification, regression
from gradscope.demo.models import Exp, UnusedBranch, kaiming, relu_mlp
from gradscope.demo.scenarios import (
    bn_eval_shift,
    dead_relu,
    exploding_lr,
    healthy_mlp,
    nan_source,
    not_in_optimizer,
    saturated_tanh,
    unused_parameter,
    vanishing_sigmoid,
)
from gradscope.demo.training import Scenario, evaluate, lm_loss, train

__all__ = [
    "BROKEN", "HEALTHY", "SCENARIOS", "Exp", "Scenario", "SyntheticData", "UnusedBranch", "build", "classification",
    "evaluate", "regression", "relu_mlp", "train",
]


# --- data only the tests' controls use -----------------------------------------------------------------


def images(n: int = 1024, classes: int = 4, size: int = 16, batch: int = 32, seed: int = 0) -> SyntheticData:
    """Each class is a smooth random template plus noise."""
    g = _gen(seed)
    templates = F.interpolate(torch.randn(classes, 3, 4, 4, generator=g), size=size, mode="bilinear")
    y = torch.randint(classes, (n,), generator=g)
    x = templates[y] + 0.8 * torch.randn(n, 3, size, size, generator=g)
    return SyntheticData(x, y, batch)


def tokens(n: int = 1024, seq: int = 16, vocab: int = 32, batch: int = 16, seed: int = 0) -> SyntheticData:
    """Next-token prediction on sequences that follow t[i+1] = (5 t[i] + 3) mod vocab from a random start."""
    g = _gen(seed)
    start = torch.randint(vocab, (n, 1), generator=g)
    seqs = [start]
    for _ in range(seq):
        seqs.append((5 * seqs[-1] + 3) % vocab)
    full = torch.cat(seqs, dim=1)
    return SyntheticData(full[:, :-1], full[:, 1:], batch)


def sequences(n: int = 1024, seq: int = 12, dim: int = 4, batch: int = 32, seed: int = 0) -> SyntheticData:
    """Sequence classification: is the running sum of the first feature positive at the end?"""
    g = _gen(seed)
    x = torch.randn(n, seq, dim, generator=g)
    return SyntheticData(x, (x[:, :, 0].sum(dim=1) > 0).long(), batch)


def binary(n: int = 2048, dim: int = 16, batch: int = 64, seed: int = 0) -> SyntheticData:
    """Linearly separable with a margin: a classifier becomes confident, its output sigmoid saturates."""
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float().unsqueeze(1)
    x[:, 0] += torch.where(y[:, 0] > 0, 1.0, -1.0)  # a margin between the classes
    return SyntheticData(x, y, batch)


# --- models only the tests' controls use ---------------------------------------------------------------


class ResidualGELU(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class ResidualMLP(nn.Module):
    def __init__(self, dim: int = 32, width: int = 64, depth: int = 4, out: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualGELU(width) for _ in range(depth))
        self.head = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(fc=nn.Linear(d, 4 * d), act=nn.GELU(), proj=nn.Linear(4 * d, d)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, heads: int = 2, layers: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class LSTMClassifier(nn.Module):
    def __init__(self, dim: int = 4, hidden: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(dim, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


# --- healthy controls beyond the demo's ----------------------------------------------------------------


def healthy_mlp_bf16(seed: int = 0) -> Scenario:
    sc = healthy_mlp(seed)
    sc.name, sc.why, sc.autocast = "healthy_mlp_bf16", "The healthy MLP under bf16 autocast.", torch.bfloat16
    return sc


def healthy_mlp_fp16_scaler(seed: int = 0) -> Scenario:
    """fp16 autocast with a GradScaler started at 2**24: it overflows and skips its first steps by design."""
    sc = healthy_mlp(seed)
    sc.name, sc.why = "healthy_mlp_fp16_scaler", "The healthy MLP in fp16 with a GradScaler calibrating its scale."
    sc.autocast, sc.scaler = torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**24)
    return sc


def healthy_cnn(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = kaiming(
        nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, 16, 3, padding=1), bn1=nn.BatchNorm2d(16), act1=nn.ReLU(),
                conv2=nn.Conv2d(16, 32, 3, stride=2, padding=1), bn2=nn.BatchNorm2d(32), act2=nn.ReLU(),
                pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), head=nn.Linear(32, 4),
            )
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Scenario(
        "healthy_cnn", "CNN with BatchNorm and SGD+momentum, evaluated on data like its training data.",
        model, opt, images(seed=seed), steps=80, eval_data=images(seed=seed + 1), eval_every=10,
    )


def healthy_transformer(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return Scenario(
        "healthy_transformer", "Small pre-LayerNorm transformer, AdamW with linear warm-up over 20 steps.",
        model, opt, tokens(seed=seed), steps=100, loss_fn=lm_loss, lr_at=lambda s: min(1.0, (s + 1) / 20),
    )


def healthy_residual_gelu(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = ResidualMLP()
    return Scenario(
        "healthy_residual_gelu", "GELU residual MLP with Adam.",
        model, torch.optim.Adam(model.parameters(), lr=1e-3), classification(seed=seed), steps=100,
    )


def healthy_lstm(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = LSTMClassifier()
    return Scenario(
        "healthy_lstm", "LSTM classifying sequences by the sign of a running sum.",
        model, torch.optim.Adam(model.parameters(), lr=3e-3), sequences(seed=seed), steps=100,
    )


def healthy_sigmoid_classifier(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = kaiming(nn.Sequential(OrderedDict(fc1=nn.Linear(16, 64), act1=nn.ReLU(), head=nn.Linear(64, 1))))
    model.add_module("prob", nn.Sigmoid())  # the output sigmoid: saturates by design once confident
    return Scenario(
        "healthy_sigmoid_classifier", "A confident binary classifier whose output sigmoid sits in its tails.",
        model, torch.optim.Adam(model.parameters(), lr=1e-2), binary(seed=seed), steps=150,
        loss_fn=F.binary_cross_entropy,
    )


HEALTHY: dict[str, Callable[..., Scenario]] = {
    f.__name__: f
    for f in (
        healthy_mlp, healthy_mlp_bf16, healthy_mlp_fp16_scaler, healthy_cnn, healthy_transformer,
        healthy_residual_gelu, healthy_lstm, healthy_sigmoid_classifier,
    )
}
BROKEN: dict[str, Callable[..., Scenario]] = {
    f.__name__: f
    for f in (
        vanishing_sigmoid, dead_relu, exploding_lr, bn_eval_shift, nan_source, not_in_optimizer,
        unused_parameter, saturated_tanh,
    )
}
SCENARIOS: dict[str, Callable[..., Scenario]] = {**HEALTHY, **BROKEN}


def build(name: str, seed: int = 0) -> Scenario:
    """A fresh, seeded scenario by name (see ``SCENARIOS``)."""
    try:
        return SCENARIOS[name](seed)
    except KeyError:
        raise KeyError(f"no zoo scenario {name!r}; choose one of {', '.join(SCENARIOS)}") from None
