"""Peak memory of a collected step: a large-vocabulary LM head, plain vs watched, each in its own process.

The model is a small trunk (token embedding, one MLP block, LayerNorm) under an LM head of vocabulary
50,257 on a batch of 4 x 256 tokens, trained with AdamW and cross-entropy: its logits (51.5M elements,
206 MB in fp32, 103 MB in bf16) and their gradient dominate a step's memory, as in a real LM.

Each (dtype, mode) runs in a fresh process: load the model, optimizer and batch, run one plain step (the
optimizer's state and the allocator are then in place), reset the resident high-water mark through
/proc/self/clear_refs, take the resident memory as the *loaded baseline*, then (for watched modes) call
``gradscope.watch`` and run the measured steps. The number reported is the peak resident memory above that
baseline (VmHWM - baseline); on a GPU, ``torch.cuda.max_memory_allocated`` above the allocated baseline.
Rounds interleave the modes; the median over rounds is reported, and the ratio to plain per round.

    python benchmarks/memory.py            # fp32 and bf16, plain / every=1 / default, 2 rounds x 4 steps
    python benchmarks/memory.py --quick    # one round of 2 steps: a minute or two

The default schedule collects every step of a run's first 16, so over a few steps "default" and "every1"
do the same work; the peak of a collected step is what both rows measure.
    python benchmarks/memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

MODES = ("plain", "every1", "default")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VOCAB, BATCH, TOKENS, WIDTH = 50257, 4, 256, 128


class LMHead(nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = WIDTH) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        x = x + self.mlp(x)
        return self.head(self.ln(x))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(dtype_name: str, mode: str, steps: int, device: str) -> dict:
    import gradscope

    torch.manual_seed(0)
    model = LMHead().to(device=device, dtype=DTYPES[dtype_name])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, VOCAB, (BATCH, TOKENS), device=device)
    target = torch.randint(0, VOCAB, (BATCH, TOKENS), device=device)
    cuda = device.startswith("cuda")

    def step(scope: object | None) -> None:
        logits = model(idx)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scope is not None:
            scope.step(loss)  # type: ignore[attr-defined]

    step(None)  # the optimizer's state exists from here on: part of the loaded baseline
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _status("VmRSS")
    scope = None
    if mode != "plain":
        scope = gradscope.watch(model, optimizer=opt, every=1 if mode == "every1" else None)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(scope)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - base
    collected = len(scope.history.records) if scope is not None else 0
    if scope is not None:
        scope.close()
    return {"peak_mib": peak / 2**20, "base_mib": base / 2**20, "ms_per_step": seconds * 1e3, "collected": collected}


def measure(dtype_name: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", dtype_name, mode, "--steps", str(args.steps), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="one round of 2 steps")
    parser.add_argument("--worker", nargs=2, metavar=("DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(worker(*args.worker, args.steps, args.device)), flush=True)
        return
    if args.quick:
        args.rounds, args.steps = 1, 2
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    unit = "CUDA allocated" if args.device.startswith("cuda") else "resident (VmHWM)"
    print(f"torch {torch.__version__}, device {args.device}, LM head batch {BATCH} x {TOKENS} tokens x vocabulary "
          f"{VOCAB} (width {WIDTH}), AdamW, {args.rounds} rounds x {args.steps} steps per process, "
          f"peak {unit} above the loaded baseline, load average {load}")  # fmt: skip
    results: dict[tuple[str, str], list[dict]] = {(d, m): [] for d in DTYPES for m in MODES}
    for r in range(args.rounds):
        for dtype_name in DTYPES:
            order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
            for mode in order:
                results[(dtype_name, mode)].append(measure(dtype_name, mode, args))
    print()
    print("| dtype | mode | peak above baseline | ratio to plain (median of rounds) | per round | ms/step | collected steps |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for dtype_name in DTYPES:
        plain = results[(dtype_name, "plain")]
        for mode in MODES:
            runs = results[(dtype_name, mode)]
            ratios = [x["peak_mib"] / p["peak_mib"] for x, p in zip(runs, plain, strict=True)]
            if mode != "plain":
                worst = max(worst, statistics.median(ratios))
            print(f"| {dtype_name} | {mode} | {statistics.median(x['peak_mib'] for x in runs):.0f} MiB "
                  f"| **{statistics.median(ratios):.3f}x** | {' '.join(f'{x:.3f}' for x in ratios)} "
                  f"| {statistics.median(x['ms_per_step'] for x in runs):.0f} | {runs[0]['collected']} |")  # fmt: skip
    print(f"\nworst watched row: {worst:.3f}x plain (target <= 1.10x)")


if __name__ == "__main__":
    main()
