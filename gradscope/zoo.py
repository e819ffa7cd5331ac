"""A zoo of small, seeded training runs on synthetic data: healthy controls and models with known faults.

Tests, examples, benchmarks and ``gradscope demo`` all reuse these. Every scenario trains in a few
seconds on a CPU, downloads nothing, and is built so that its fault is physically real (the gradient
really vanishes, the units really are dead), not simulated. ``Scenario.expect`` names the finding
(kind, layer) the scenario must produce; healthy controls expect nothing of severity warning or above.

    from gradscope import zoo, watch
    sc = zoo.build("dead_relu")
    with watch(sc.model, sc.optimizer, every=1) as scope:
        sc.run(scope)
        print(scope.report().findings)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


# --- data --------------------------------------------------------------------------------------------


@dataclass
class SyntheticData:
    """A fixed in-memory dataset served in deterministic batches (no RNG consumed while training)."""

    x: Tensor
    y: Tensor
    batch_size: int

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        n = self.x.shape[0]
        idx = (torch.arange(self.batch_size) + step * self.batch_size) % n
        return self.x[idx], self.y[idx]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def classification(n: int = 2048, dim: int = 32, classes: int = 4, batch: int = 64, seed: int = 0) -> SyntheticData:
    """Labels from a random teacher network: learnable, but not linearly trivial."""
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 64, generator=g) / math.sqrt(dim)
    w2 = torch.randn(64, classes, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return SyntheticData(x, y, batch)


def regression(n: int = 2048, dim: int = 16, batch: int = 64, seed: int = 0) -> SyntheticData:
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g) / math.sqrt(dim)
    return SyntheticData(x, torch.sin(x @ w * 2) + 0.5 * x[:, :1], batch)


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


# --- training ----------------------------------------------------------------------------------------


def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SyntheticData,
    steps: int,
    scope: Any = None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    lr_at: Callable[[int], float] | None = None,
    eval_data: SyntheticData | None = None,
    eval_every: int = 0,
    autocast: torch.dtype | None = None,
    after_backward: Callable[[int], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> list[float]:
    """A plain training loop; returns the losses. ``lr_at(step)`` multiplies each group's initial lr.

    With a scope, the loss of each step is given to it (``scope.step(loss=...)``). Evaluation forwards
    run under ``torch.no_grad()`` in eval mode every ``eval_every`` steps, as a real loop would.
    ``after_backward(step)`` runs between backward and the optimizer step (to read ``.grad`` in tests).
    With a ``scaler`` (mixed precision), the loss is scaled and the scaler steps and updates.
    """
    base = [g["lr"] for g in optimizer.param_groups]
    losses: list[float] = []
    model.train()
    for step in range(steps):
        if lr_at is not None:
            for g, lr in zip(optimizer.param_groups, base, strict=True):
                g["lr"] = lr * lr_at(step)
        x, y = data.batch(step)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = model(x)
        loss = loss_fn(out.float(), y)
        if scaler is None:
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if after_backward is not None:
                after_backward(step)
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        losses.append(float(loss.detach()))
        if scope is not None:
            scope.step(loss=losses[-1])
        if eval_data is not None and eval_every and (step + 1) % eval_every == 0:
            evaluate(model, eval_data)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: SyntheticData, batches: int = 2) -> None:
    """Evaluation forwards (eval mode, no grad), restoring training mode after."""
    model.eval()
    try:
        for b in range(batches):
            model(data.batch(b)[0])
    finally:
        model.train()


@dataclass
class Scenario:
    """A model, its optimizer and data, and how to train it; ``expect`` is the fault it must be caught as."""

    name: str
    why: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: SyntheticData
    steps: int
    expect: tuple[str, str] | None = None  # (kind, layer); None for a healthy control
    loss_fn: LossFn = F.cross_entropy
    lr_at: Callable[[int], float] | None = None
    eval_data: SyntheticData | None = None
    eval_every: int = 0
    autocast: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @property
    def healthy(self) -> bool:
        return self.expect is None

    def run(self, scope: Any = None, after_backward: Callable[[int], None] | None = None) -> list[float]:
        return train(
            self.model, self.optimizer, self.data, self.steps, scope,
            loss_fn=self.loss_fn, lr_at=self.lr_at, eval_data=self.eval_data,
            eval_every=self.eval_every, autocast=self.autocast, after_backward=after_backward,
            scaler=self.scaler,
        )


# --- building blocks ---------------------------------------------------------------------------------


def _kaiming(model: nn.Module) -> nn.Module:
    """He init for ReLU layers: keeps activation variance constant through depth."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def relu_mlp(dim: int = 32, width: int = 128, out: int = 4, dropout: float = 0.0) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(fc1=nn.Linear(dim, width), act1=nn.ReLU())
    if dropout:
        layers["drop"] = nn.Dropout(dropout)
    layers.update(fc2=nn.Linear(width, width), act2=nn.ReLU(), head=nn.Linear(width, out))
    return _kaiming(nn.Sequential(layers))


class Exp(nn.Module):
    """exp(x): overflows to inf for inputs above ~88, a classic NaN source."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(x)


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


class UnusedBranch(nn.Module):
    """A frozen pretrained stem, a trained body, and an ``aux`` head that forward() never calls."""

    def __init__(self, dim: int = 32, width: int = 64, out: int = 4) -> None:
        super().__init__()
        self.stem, self.act1 = nn.Linear(dim, width), nn.ReLU()
        self.fc, self.act2, self.head = nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out)
        self.aux = nn.Linear(width, out)  # defined, never used: its parameters never get a gradient
        _kaiming(self)
        self.stem.requires_grad_(False)  # frozen on purpose: must not be reported

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act2(self.fc(self.act1(self.stem(x)))))


# --- healthy controls --------------------------------------------------------------------------------


def healthy_mlp(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = relu_mlp(dropout=0.1)
    return Scenario(
        "healthy_mlp", "ReLU MLP with Kaiming init, dropout and Adam: nothing to find.",
        model, torch.optim.Adam(model.parameters(), lr=1e-3), classification(seed=seed), steps=120,
    )


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
    model = _kaiming(
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
    model = _kaiming(nn.Sequential(OrderedDict(fc1=nn.Linear(16, 64), act1=nn.ReLU(), head=nn.Linear(64, 1))))
    model.add_module("prob", nn.Sigmoid())  # the output sigmoid: saturates by design once confident
    return Scenario(
        "healthy_sigmoid_classifier", "A confident binary classifier whose output sigmoid sits in its tails.",
        model, torch.optim.Adam(model.parameters(), lr=1e-2), binary(seed=seed), steps=150,
        loss_fn=F.binary_cross_entropy,
    )


# --- broken models -----------------------------------------------------------------------------------


def vanishing_sigmoid(seed: int = 0, depth: int = 12) -> Scenario:
    """Default init + sigmoid: each layer multiplies the gradient by ~0.25 x 0.58, so ~1e-10 after 12."""
    torch.manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(depth):
        layers[f"fc{i}"], layers[f"sig{i}"] = nn.Linear(32, 32), nn.Sigmoid()
    layers["head"] = nn.Linear(32, 4)
    model = nn.Sequential(layers)
    return Scenario(
        "vanishing_sigmoid", f"A {depth}-layer sigmoid MLP trained with SGD: the first layers get no gradient.",
        model, torch.optim.SGD(model.parameters(), lr=0.1), classification(seed=seed), steps=60,
        expect=("vanishing_gradient", "fc0"),
    )


def dead_relu(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = relu_mlp(width=64)
    with torch.no_grad():
        model.fc2.bias.fill_(-10.0)  # pre-activations ~N(-10, 1): every unit of act2 is off, for good
    return Scenario(
        "dead_relu", "A ReLU layer whose bias is -10: all its units output zero and never recover.",
        model, torch.optim.Adam(model.parameters(), lr=1e-3), classification(seed=seed), steps=60,
        expect=("dead_relu", "act2"),
    )


def exploding_lr(seed: int = 0, at: int | None = 40) -> Scenario:
    """SGD on a regression whose lr goes up 100-fold at step ``at`` (``at=None``: never, the control)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(16, 64), act1=nn.LeakyReLU(0.2), fc2=nn.Linear(64, 64), act2=nn.LeakyReLU(0.2),
            head=nn.Linear(64, 1),
        )
    )
    steps = (40 if at is None else at) + 20
    return Scenario(
        "exploding_lr", f"Regression with SGD whose learning rate is raised 100-fold at step {at}: it diverges.",
        model, torch.optim.SGD(model.parameters(), lr=0.01), regression(seed=seed), steps=steps,
        loss_fn=F.mse_loss, lr_at=None if at is None else (lambda s: 1.0 if s < at else 100.0),
        expect=None if at is None else ("exploding_gradient", "fc1"),
    )


def bn_eval_shift(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = _kaiming(
        nn.Sequential(
            OrderedDict(
                bn0=nn.BatchNorm1d(32), fc1=nn.Linear(32, 64), act1=nn.ReLU(), head=nn.Linear(64, 4),
            )
        )
    )
    train_data = classification(seed=seed)
    raw = classification(seed=seed + 1)
    # The eval pipeline forgot to standardize: features arrive with mean 5 and std 20.
    eval_data = SyntheticData(raw.x * 20 + 5, raw.y, raw.batch_size)
    return Scenario(
        "bn_eval_shift", "BatchNorm whose eval inputs were not standardized like the training inputs.",
        model, torch.optim.Adam(model.parameters(), lr=1e-3), train_data, steps=60,
        eval_data=eval_data, eval_every=10, expect=("normalization_drift", "bn0"),
    )


def nan_source(seed: int = 0, at: int = 25) -> Scenario:
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(32, 32), act1=nn.ReLU(), fc2=nn.Linear(32, 32), exp=Exp(), head=nn.Linear(32, 4),
        )
    )
    data = classification(seed=seed)
    data.x[at * data.batch_size % data.x.shape[0]] *= 1e4  # one corrupt sample, first served at step `at`
    return Scenario(
        "nan_source", f"exp() of a corrupt sample overflows at step {at}; every later layer inherits the inf/NaN.",
        model, torch.optim.SGD(model.parameters(), lr=0.01), data, steps=at + 10,
        expect=("nonfinite", "exp"),
    )


def not_in_optimizer(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = relu_mlp(width=64)
    params = [*model.fc1.parameters(), *model.head.parameters()]  # fc2 forgotten
    return Scenario(
        "not_in_optimizer", "fc2 was left out of the optimizer: it gets gradients but never trains.",
        model, torch.optim.Adam(params, lr=1e-3), classification(seed=seed), steps=40,
        expect=("not_in_optimizer", "fc2"),
    )


def unused_parameter(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = UnusedBranch()
    params = [p for p in model.parameters() if p.requires_grad]
    return Scenario(
        "unused_parameter", "An aux head defined but never called (and a frozen stem, which is fine).",
        model, torch.optim.Adam(params, lr=1e-3), classification(seed=seed), steps=40,
        expect=("unused_parameter", "aux"),
    )


def saturated_tanh(seed: int = 0) -> Scenario:
    torch.manual_seed(seed)
    model = _kaiming(
        nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(32, 64), act1=nn.Tanh(), fc2=nn.Linear(64, 64), act2=nn.ReLU(),
                head=nn.Linear(64, 4),
            )
        )
    )
    with torch.no_grad():
        model.fc1.weight.normal_(0.0, 30 / math.sqrt(32))  # pre-activations ~N(0, 30^2): tanh pinned at +/-1
    return Scenario(
        "saturated_tanh", "tanh behind a layer initialized 30x too large: its outputs sit at +/-1.",
        model, torch.optim.Adam(model.parameters(), lr=1e-3), classification(seed=seed), steps=60,
        expect=("saturated_activation", "act1"),
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
