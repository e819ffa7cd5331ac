"""A tiny nanoGPT-style character model, trained for a few seconds on CPU with gradscope watching.

Two pre-LayerNorm transformer blocks on a short built-in text, AdamW with linear warm-up and cosine
decay. The schedule shows in the report (the lr line) and in TensorBoard (lr/group0); a healthy run
like this one should come out with no warnings.

    python examples/nanogpt_char.py
    tensorboard --logdir runs/nanogpt_char
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

import gradscope

TEXT = """\
The gradient is the messenger of the loss. It walks backwards through the network, layer by layer,
and at every layer it says how the weights should change. When the messenger grows faint, the early
layers never hear the news; when it shouts, the weights are thrown about and learn nothing at all.
A careful engineer listens to the messenger at every layer, and not only to the loss at the end.
"""

BLOCK, EMBD, HEADS, LAYERS = 32, 48, 4, 2
STEPS, WARMUP, BATCH, LR = 150, 15, 16, 3e-3


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(EMBD, 3 * EMBD)
        self.proj = nn.Linear(EMBD, EMBD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(EMBD, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(EMBD), CausalSelfAttention()
        self.ln2 = nn.LayerNorm(EMBD)
        self.mlp = nn.Sequential(nn.Linear(EMBD, 4 * EMBD), nn.GELU(), nn.Linear(4 * EMBD, EMBD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, EMBD)
        self.pos = nn.Embedding(BLOCK, EMBD)
        self.blocks = nn.Sequential(*(Block() for _ in range(LAYERS)))
        self.ln_f = nn.LayerNorm(EMBD)
        self.head = nn.Linear(EMBD, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln_f(self.blocks(self.tok(idx) + self.pos(pos))))  # (B, T, vocab)


def main() -> None:
    torch.manual_seed(0)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    model = TinyGPT(len(chars))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    # Linear warm-up, then cosine decay to zero: gradscope judges update sizes against this schedule.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / WARMUP if s < WARMUP else 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (STEPS - WARMUP)))
    )

    with gradscope.watch(model, opt, log_dir="runs/nanogpt_char", every=5, console=True) as scope:
        for _ in range(STEPS):
            i = torch.randint(0, len(data) - BLOCK - 1, (BATCH,))
            x = torch.stack([data[j : j + BLOCK] for j in i])  # (B, T)
            y = torch.stack([data[j + 1 : j + BLOCK + 1] for j in i])
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            scope.step(loss=loss)

    # A few greedy characters, to see that it learned something.
    idx = data[:BLOCK].unsqueeze(0)
    with torch.no_grad():
        for _ in range(60):
            nxt = model(idx[:, -BLOCK:])[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
    print("sample:", "".join(chars[int(i)] for i in idx[0, BLOCK:]).replace("\n", " "))


if __name__ == "__main__":
    main()
