"""No blind spots (issue "exact dating, early steps, gradients before clipping, NaN born in backward").

Real runs at gradscope's DEFAULT schedule; each test measures its ground truth in plain torch inside the
test (an unwatched twin run, or hooks of its own), never by reading gradscope's output back.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.schedule import DENSE_START
from gradscope.stats.clipping import clip_summary

VOCAB, SEQ, D = 16, 12, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- a small nanoGPT-style model, written here ------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Manual attention as nanoGPT writes it without flash: masked_fill(-inf) then softmax. A key-padding
    mask that hides every key of a row makes that row all -inf, and softmax of it NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        _, T, C = x.shape  # (B, T, C)
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each, one head
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C)  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        keep = causal if pad is None else causal & ~pad[:, None, :]  # pad: (B, T) True = padding key
        att = F.softmax(att.masked_fill(~keep, float("-inf")), dim=-1)
        return self.c_proj(att @ v)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(D)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pad)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.wpe = nn.Embedding(SEQ, D)
        self.h = nn.ModuleList(Block() for _ in range(layers))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        for name, p in self.named_parameters():  # nanoGPT's init
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x, pad)
        return self.lm_head(self.ln_f(x))


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Next-token data with structure to learn: each row counts up from a random start, modulo VOCAB."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (8, 1), generator=g)
        seq = (start + torch.arange(SEQ + 1)) % VOCAB
        out.append((seq[:, :-1], seq[:, 1:].clone()))
    return out


def train_gpt(
    lr: float, steps: int, *, watch: bool, labels_dropped: set[int] = frozenset(), **kw
) -> tuple[list[float], dict[str, list[float]], object]:
    """AdamW with no warm-up. Returns the losses, the plain-torch update/weight ratio of every matrix per
    step, and the scope (or None). ``labels_dropped``: steps whose batch has every label ignored (-100)."""
    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scope = gradscope.watch(model, optimizer=opt, **kw) if watch else None
    losses: list[float] = []
    ratios: dict[str, list[float]] = {n: [] for n, p in model.named_parameters() if p.dim() == 2}
    for step, (x, y) in enumerate(batches(steps)):
        if step in labels_dropped:
            y = torch.full_like(y, -100)  # a batch of padding only: cross-entropy over no target is 0/0
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if n in ratios}
        opt.step()
        for n, p in model.named_parameters():
            if n in ratios:
                ratios[n].append(float((p.detach() - before[n]).norm() / before[n].norm()))
        if scope is not None:
            scope.step(loss)
        losses.append(loss.item())
    if scope is not None:
        scope.close()
    return losses, ratios, scope


# --- 1. lr 100x with no warm-up: the damage is done in the first steps, which are collected -------------
def test_lr_100x_without_warmup_is_seen_where_it_happens():
    lr = 100 * 6e-4  # nanoGPT's learning rate, 100x
    plain_losses, plain_ratios, _ = train_gpt(lr, 40, watch=False)
    losses, _, scope = train_gpt(lr, 40, watch=True)
    assert losses == plain_losses  # bit-identical with gradscope watching

    # Ground truth, plain torch: the updates rewrite the weights at the start (ratio > 0.1) ...
    name = "h.0.mlp.0.weight"
    big = [s for s, r in enumerate(plain_ratios[name]) if r > 0.1]
    assert big and big[0] == 0
    # ... and every one of those steps is collected at the default schedule, with the same ratio.
    recs = {r.step: r for r in scope.history.records}
    for s in big:
        assert s in recs, f"step {s} (update ratio {plain_ratios[name][s]:.2f}) was not collected"
        assert recs[s].params[name].update_to_weight == pytest.approx(plain_ratios[name][s], rel=1e-3)
    assert set(range(DENSE_START)) <= set(recs)
    # every loss is there, dated, from step 0
    assert [s for s, _ in scope.history.loss_start][:DENSE_START] == list(range(DENSE_START))


# --- 2. a NaN loss at a step the default schedule does not collect: dated exactly -------------------------
def test_nan_loss_at_an_uncollected_step_is_dated_exactly_and_localised_next_time():
    dropped = {23, 30, 37}  # every 7th batch from 23 has all labels ignored
    plain_losses, _, _ = train_gpt(6e-4, 40, watch=False, labels_dropped=dropped)
    losses, _, scope = train_gpt(6e-4, 40, watch=True, labels_dropped=dropped)
    assert [s for s, v in enumerate(plain_losses) if not math.isfinite(v)] == sorted(dropped)  # ground truth
    assert str(losses) == str(plain_losses)  # bit-identical, NaN included

    collected = {r.step for r in scope.history.records}
    assert 23 not in collected and 24 in collected  # the burst collects the steps after the NaN
    (f,) = [f for f in scope.last_report.findings if f.kind == "nonfinite"]
    assert (f.step, f.layer, f.severity) == (23, "", "critical")
    assert f.evidence["source"] == "loss" and f.evidence["step"] == 23 and f.evidence["collected"] == 0
    assert "not collected" in f.message and "every module output was finite" not in f.message.split(";")[0]
    # its next occurrence, step 30, was collected: every module output finite, the loss made it
    assert "step 30" in f.message and "loss computation" in f.message


def test_nan_loss_at_a_collected_step_says_the_loss_made_it():
    losses, _, scope = train_gpt(6e-4, 12, watch=True, labels_dropped={3})
    assert not math.isfinite(losses[3]) and all(math.isfinite(v) for i, v in enumerate(losses) if i != 3)
    (f,) = [f for f in scope.last_report.findings if f.kind == "nonfinite"]
    assert (f.step, f.layer) == (3, "")
    assert f.evidence["tensor"] == "loss" and "every module output was finite" in f.message


# --- 3. NaN born inside attention: the attention module is named -----------------------------------------
def plain_attention_facts(pad_step: int) -> dict[str, bool]:
    """Plain torch: at the padded step, which modules had finite inputs and a non-finite output."""
    torch.manual_seed(0)
    model = GPT()
    facts: dict[str, bool] = {}

    def hook(name):
        def fn(module, inputs, output):
            ins = [t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
            facts[name] = all(bool(torch.isfinite(t).all()) for t in ins) and not bool(
                torch.isfinite(output).all()
            )

        return fn

    for name, m in model.named_modules():
        if name:
            m.register_forward_hook(hook(name))
    x, _ = batches(pad_step + 1)[pad_step]
    pad = torch.zeros_like(x, dtype=torch.bool)
    pad[0] = True  # the first sequence is padding only
    model(x, pad)
    return facts


def train_padded(pad_steps: set[int], steps: int) -> object:
    """A loop without an optimizer hook (scope.step() ends a step) that skips non-finite updates, as
    careful loops do, so the NaN can come back and be seen being born."""
    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with gradscope.watch(model) as scope:
        for step, (x, y) in enumerate(batches(steps)):
            pad = torch.zeros_like(x, dtype=torch.bool)
            if step in pad_steps:
                pad[0] = True
                y = y.clone()
                y[0] = -100  # padded positions carry no target: the loss stays finite
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x, pad).reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            if all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
                opt.step()
            scope.step(loss)
    return scope


def test_nan_born_inside_attention_names_the_attention_module():
    truth = plain_attention_facts(3)
    born = [n for n, b in truth.items() if b]
    assert born[0] == "h.0.attn" and not truth["h.0.attn.c_proj"]  # ground truth: c_proj only passed it on
    scope = train_padded({3}, 8)
    (f,) = [f for f in scope.last_report.findings if f.kind == "nonfinite"]
    assert (f.layer, f.step) == ("h.0.attn", 3)
    assert f.evidence["tensor"] == "output" and f.evidence["born_here"] == 1


def test_nan_born_at_an_uncollected_step_is_localised_at_its_next_occurrence():
    scope = train_padded({23, 27}, 30)
    collected = {r.step for r in scope.history.records}
    assert 23 not in collected and 27 in collected  # 27: inside the burst the NaN gradient norm started
    (f,) = [f for f in scope.last_report.findings if f.kind == "nonfinite"]
    assert f.step == 23 and f.layer == "h.0.attn"
    assert f.evidence["source"] == "gradient norm" and f.evidence["first_seen_step"] == 27
    assert "not collected" in f.message and "h.0.attn" in f.message


# --- 4. NaN born in a module's backward only ---------------------------------------------------------
class NanBackward(torch.autograd.Function):
    """Identity forward; from ``Poison.on`` on, a backward that returns NaN for the input gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan") if Poison.on else g


class Poison(nn.Module):
    on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NanBackward.apply(x)


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), Poison(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def test_nan_born_in_a_modules_backward_is_named():
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    # Ground truth, plain torch: Poison's output gradient is finite, the one it passes back is NaN, and
    # the first NaN tensor in backward is the output gradient of the Tanh before it.
    model = mlp()
    seen: dict[str, bool] = {}
    model[2].register_full_backward_hook(
        lambda m, gin, gout: seen.update(
            out=bool(torch.isfinite(gout[0]).all()), inp=bool(torch.isfinite(gin[0]).all())
        )
    )
    Poison.on = True
    try:
        F.mse_loss(model(x), y).backward()
    finally:
        Poison.on = False
    assert seen == {"out": True, "inp": False}

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, optimizer=opt) as scope:
        for step in range(8):
            Poison.on = step == 5
            try:
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
            finally:
                Poison.on = False
            opt.step()
            scope.step(loss)
    (f,) = [f for f in scope.last_report.findings if f.kind == "nonfinite"]
    assert (f.layer, f.step) == ("2", 5)
    assert f.evidence["tensor"] == "input gradient" and "backward" in f.message


# --- 5. the clipped tanh RNN (Pascanu et al., 2013): gradients as backward produced them -------------------
class RNNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 32, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(32, 1)
        with torch.no_grad():  # a recurrent matrix of spectral radius 2
            w = torch.randn(32, 32)
            self.rnn.weight_hh_l0.copy_(2.0 * w / torch.linalg.eigvals(w).abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def train_rnn(watch: bool) -> tuple[list[dict[str, float]], list[dict[str, float]], list[float], object]:
    torch.manual_seed(0)
    model = RNNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    pre: list[dict[str, float]] = []
    post: list[dict[str, float]] = []
    totals: list[float] = []
    scope = gradscope.watch(model, optimizer=opt) if watch else None
    for _ in range(20):
        x, y = torch.randn(16, 50, 4, generator=g), torch.randn(16, 1, generator=g)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        pre.append({n: float(p.grad.norm()) for n, p in model.named_parameters()})
        totals.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        post.append({n: float(p.grad.norm()) for n, p in model.named_parameters()})
        opt.step()
        if scope is not None:
            scope.step(loss)
    if scope is not None:
        scope.close()
    return pre, post, totals, scope


def test_clipped_rnn_gradients_are_read_before_the_clip():
    pre, post, totals, _ = train_rnn(watch=False)
    # Ground truth: the pre-clip gradient explodes at the recurrent weights, the clip hides it.
    assert min(p["rnn.weight_hh_l0"] for p in pre) > 50 * max(p["head.weight"] for p in pre)
    assert all(t > 100 for t in totals)
    _, _, w_totals, scope = train_rnn(watch=True)
    assert w_totals == totals  # bit-identical
    for rec in scope.history.records:
        s = rec.step
        for name, ps in rec.params.items():
            assert ps.grad_norm == pytest.approx(pre[s][name], rel=1e-4)
            assert ps.grad_norm_clipped == pytest.approx(post[s][name], rel=1e-4)
        assert rec.clip_ratio == pytest.approx(totals[s], rel=1e-4)  # clipped to norm 1
    summary = clip_summary(scope.history)  # the clip acted on every collected step
    assert summary["clipped_share"] == 1.0 and summary["median_ratio"] > 100
    # The clip hides an explosion at the recurrent weights: reported there, never at the head.
    exploding = [f for f in scope.last_report.findings if f.kind == "exploding_gradient"]
    assert [f.layer for f in exploding] == ["rnn"]
    (f,) = exploding
    assert f.severity in ("warning", "critical") and f.step == 0
    assert f.evidence["pattern"] == "clipped" and f.evidence["clip_ratio"] > 100


class MHABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.fc = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        # need_weights=True (the default) takes the explicit softmax path: a fully masked row is NaN there
        return self.fc(x + self.attn(h, h, h, key_padding_mask=pad)[0])


def test_nan_born_in_torch_multihead_attention_is_named_there():
    torch.manual_seed(0)
    model = MHABlock()
    x, pad = torch.randn(4, SEQ, D), torch.zeros(4, SEQ, dtype=torch.bool)
    pad[1] = True  # one sequence of padding only: its softmax rows are all -inf
    # ground truth, plain torch: the attention's input is finite, its output is not
    h = model.ln(x)
    assert torch.isfinite(h).all() and not torch.isfinite(model.attn(h, h, h, key_padding_mask=pad)[0]).all()
    with gradscope.watch(model) as scope:
        for step in range(3):
            model.zero_grad()
            model(x, pad if step == 2 else torch.zeros_like(pad)).pow(2).mean().backward()
            scope.step()
    (f,) = [f for f in scope.last_report.findings if f.kind == "nonfinite"]
    assert (f.layer, f.step, f.evidence["tensor"]) == ("attn", 2, "output")
