"""Real architectures and training loops shared by test_real_architectures.py and test_real_pathologies.py.

Small enough for CPU tests (width 32-48, two layers, a few dozen steps), written the way their originals
are: a nanoGPT-style GPT (its own LayerNorm class, functional attention, weight tying, AdamW with decay and
no-decay groups), a ResNet-style CNN whose blocks reuse ``self.relu``, an LSTM, and Hugging Face models
built from configs. Data is synthetic and learnable: a peaked Markov chain over a vocabulary, class
prototypes plus noise for images. Every loop watches at gradscope's default settings (no ``every``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

import gradscope
from gradscope.findings import Finding, Report

VOCAB = 65  # nanoGPT's shakespeare_char vocabulary
BLOCK = 32


def loud(report: Report) -> list[tuple[str, str, str]]:
    """Findings above info: what a healthy run must not have."""
    return [(f.kind, f.layer, f.severity) for f in report.findings if f.severity != "info"]


def at_least_warning(report: Report, *kinds: str) -> list[Finding]:
    return [f for f in report.findings if f.kind in kinds and f.severity in ("warning", "critical")]


def markov_tokens(n: int = 8000, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """A peaked Markov chain: each token has a few likely successors, so a model can learn it."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.rand(vocab, vocab, generator=g) ** 8
    trans /= trans.sum(1, keepdim=True)
    u = torch.rand(n, generator=g)
    cdf = trans.cumsum(1)
    out = [0]
    for t in range(1, n):
        out.append(int(torch.searchsorted(cdf[out[-1]], u[t]).clamp(max=vocab - 1)))
    return torch.tensor(out)


# --- nanoGPT --------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: a user-written class with an optional bias (torch.nn has none until 2.1)."""

    def __init__(self, ndim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, mask_bug: bool = False) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.heads = heads
        self.mask_bug = mask_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        if self.mask_bug:
            mask[0, 0] = False  # a padding mask that leaves the first query nothing to attend to
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mask_bug: bool) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, mask_bug)
        self.ln_2 = LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, d: int = 48, layers: int = 2, heads: int = 2, std: float = 0.02, mask_bug: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(BLOCK, d)
        self.h = nn.ModuleList(Block(d, heads, mask_bug) for _ in range(layers))
        self.ln_f = LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


@dataclass
class Run:
    report: Report
    losses: list[float]
    measured: dict[str, list[float]] = field(default_factory=dict)  # what the test measured by hand


Probe = Callable[[int, nn.Module, "Run"], None]


def train_gpt(
    *,
    steps: int = 60,
    lr: float = 1e-3,
    std: float = 0.02,
    zero_grad: bool = True,
    mask_bug: bool = False,
    warmup: int = 0,
    after_backward: Probe | None = None,
    after_step: Probe | None = None,
) -> Run:
    """nanoGPT's loop in miniature: AdamW (decay on matrices only), batch 8 x 32 characters."""
    torch.manual_seed(0)
    data = markov_tokens()
    model = GPT(std=std, mask_bug=mask_bug)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99)
    )
    g = torch.Generator().manual_seed(1)
    run = Run(Report(), [])
    with gradscope.watch(model, opt) as scope:
        for step in range(steps):
            if warmup:
                for group in opt.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / warmup)
            ix = torch.randint(0, len(data) - BLOCK - 1, (8,), generator=g)
            x = torch.stack([data[i : i + BLOCK] for i in ix])
            y = torch.stack([data[i + 1 : i + BLOCK + 1] for i in ix])
            loss = model(x, y)
            if zero_grad:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            run.losses.append(loss.item())
            if after_backward is not None:
                after_backward(step, model, run)
            opt.step()
            scope.step(loss=run.losses[-1])
            if after_step is not None:
                after_step(step, model, run)
        run.report = scope.report()
    return run


# --- Hugging Face models from configs -------------------------------------------------------------------

HF_VOCAB = 96


def hf_model(name: str) -> nn.Module:
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    if name == "gpt2":
        cfg = GPT2Config(vocab_size=HF_VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = BertConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)
        return BertForMaskedLM(cfg)
    if name == "llama":
        cfg = LlamaConfig(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                          bos_token_id=0, eos_token_id=0)
        return LlamaForCausalLM(cfg)
    if name == "t5":
        cfg = T5Config(vocab_size=HF_VOCAB, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T5ForConditionalGeneration(cfg)
    raise ValueError(name)


def hf_batch(name: str, data: torch.Tensor, g: torch.Generator, batch: int = 8, length: int = 16) -> dict:
    ix = torch.randint(0, len(data) - length - 1, (batch,), generator=g)
    x = torch.stack([data[i : i + length] for i in ix])
    if name in ("gpt2", "llama"):
        return {"input_ids": x, "labels": x}
    if name == "bert":  # masked language modelling: 15 % of the tokens, [MASK] = 1
        masked = torch.rand(x.shape, generator=g) < 0.15
        labels = x.masked_fill(~masked, -100)
        return {"input_ids": x.masked_fill(masked, 1), "labels": labels}
    return {"input_ids": x, "labels": torch.stack([data[i + 1 : i + length + 1] for i in ix])}


def train_hf(name: str, *, steps: int = 40, lr: float = 1e-3, after_step: Probe | None = None) -> Run:
    """The Trainer's defaults in a plain loop: AdamW, no warm-up, no clipping; the loss from the outputs."""
    model = hf_model(name)
    data = markov_tokens(4000, HF_VOCAB)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    run = Run(Report(), [])
    with gradscope.watch(model, opt) as scope:
        for step in range(steps):
            loss = model(**hf_batch(name, data, g)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.losses.append(loss.item())
            scope.step(loss=run.losses[-1])
            if after_step is not None:
                after_step(step, model, run)
        run.report = scope.report()
    return run


# --- a ResNet-style CNN ----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ``self.relu`` module applied twice per block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class ResNet(nn.Module):
    def __init__(self, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(c)
        self.layer2 = BasicBlock(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.layer2(self.layer1(x))).flatten(1))


def images(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes: a fixed 3x8x8 prototype each, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    protos = torch.randn(10, 3, 8, 8, generator=g)
    return protos[y] + 0.8 * torch.randn(n, 3, 8, 8, generator=g), y


def train_cnn(*, lr: float = 0.05, steps: int = 80) -> tuple[Run, float]:
    """SGD with momentum, as a Lightning CNN's configure_optimizers would; returns the run and its accuracy."""
    torch.manual_seed(0)
    model = ResNet()
    x, y = images()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    run = Run(Report(), [])
    with gradscope.watch(model, opt) as scope:
        for _ in range(steps):
            ix = torch.randint(0, len(x), (32,), generator=g)
            loss = F.cross_entropy(model(x[ix]), y[ix])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.losses.append(loss.item())
            scope.step(loss=run.losses[-1])
        run.report = scope.report()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return run, accuracy


# --- an LSTM ---------------------------------------------------------------------------------------------


class LSTMTagger(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


def train_lstm(*, steps: int = 60, lr: float = 1e-2) -> Run:
    torch.manual_seed(0)
    data = markov_tokens()
    model = LSTMTagger()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    run = Run(Report(), [])
    with gradscope.watch(model, opt) as scope:
        for _ in range(steps):
            ix = torch.randint(0, len(data) - BLOCK - 1, (8,), generator=g)
            x = torch.stack([data[i : i + BLOCK] for i in ix])
            y = torch.stack([data[i + 1 : i + BLOCK + 1] for i in ix])
            loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run.losses.append(loss.item())
            scope.step(loss=run.losses[-1])
        run.report = scope.report()
    return run
