"""Overhead of gradscope on real training steps: plain vs watched, side by side in one run.

Each (model, mode) measurement runs in its own process; rounds interleave the modes so that drift of
the machine (thermal, other load) hits all of them alike. The ratio to plain is computed per round from
the mean step time over the same number of steps, then the median over rounds is reported.

    python benchmarks/overhead.py                 # all models, CPU, torch's default thread count
    python benchmarks/overhead.py --threads 1     # one torch thread per process (how the targets are set)
    python benchmarks/overhead.py --inprocess --threads 1   # a collected step's cost, inside one process
    python benchmarks/overhead.py --quick         # mlp + nanogpt, few rounds: a few minutes
    python benchmarks/overhead.py --device cuda   # the same on a GPU (also counts host-device syncs)
    python benchmarks/overhead.py --models mlp --rounds 5
    python benchmarks/overhead.py --ddp             # 2-process DDP on CPU (gloo) vs plain DDP

Modes: ``plain``; ``control`` (plain again in another process: the noise floor); ``every1`` (every step
collected); ``default`` (gradscope's default schedule from step 0 over ``--default-steps`` steps, dense
start included: every 10th step until 200, then every 50th).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

# The default schedule collects every 10th step until step 200, then every 50th: "every10" measures the
# first phase and "every50" the long-run phase, each in steady state. "control" is plain training again,
# in its own process: its ratio to plain is the noise floor of this machine.
MODES = ("plain", "control", "every1", "default")
EVERY: dict[str, int | None] = {"every1": 1, "default": None}  # None: watch()'s default schedule


# --- models -----------------------------------------------------------------------------------------
def mlp() -> tuple[nn.Module, callable]:
    layers: list[nn.Module] = [nn.Linear(512, 512)]
    for _ in range(7):
        layers += [nn.ReLU(), nn.Linear(512, 512)]
    model = nn.Sequential(*layers, nn.ReLU())

    def batch(device):
        return torch.randn(128, 512, device=device), torch.randn(128, 512, device=device)

    return model, batch


def cnn() -> tuple[nn.Module, callable]:
    blocks: list[nn.Module] = []
    cin = 3
    for cout in (32, 64, 64, 128):
        blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))

    def batch(device):
        return torch.randn(32, 3, 32, 32, device=device), torch.randn(32, 10, device=device)

    return model, batch


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 256, heads: int = 4, layers: int = 4, seq: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), 1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def gpt() -> tuple[nn.Module, callable]:
    model = GPT()

    def batch(device):
        idx = torch.randint(0, 256, (8, 128), device=device)
        return idx, torch.randint(0, 256, (8, 128), device=device)

    return model, batch


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one qkv projection, fused causal scaled-dot-product attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's "baby" CPU configuration of its README (shakespeare-char): 4 layers, 4 heads, 128 wide,
    block 64, batch 12, vocabulary 65, no dropout, tied embeddings."""

    def __init__(self, vocab: int = 65, d: int = 128, heads: int = 4, layers: int = 4, block: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList(NanoBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as nanoGPT

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nanogpt() -> tuple[nn.Module, callable]:
    model = NanoGPT()

    def batch(device):
        idx = torch.randint(0, 65, (12, 64), device=device)
        return idx, torch.randint(0, 65, (12, 64), device=device)

    return model, batch


MODELS = {"mlp": mlp, "cnn": cnn, "gpt": gpt, "nanogpt": nanogpt}
LM_MODELS = ("gpt", "nanogpt")  # trained with cross-entropy on next tokens


def _loss_fn(model_name: str):
    if model_name in LM_MODELS:
        return lambda out, y: nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())
    return nn.functional.mse_loss


def _threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# --- one measurement, in its own process ---------------------------------------------------------------
def worker(
    model_name: str, mode: str, steps: int, warmup: int, device: str, seed: int, threads: int | None
) -> dict | None:
    import gradscope

    _threads(threads)
    distributed = "WORLD_SIZE" in os.environ  # started by torchrun: one rank of a DDP job
    rank = 0
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    torch.manual_seed(seed)
    model, make_batch = MODELS[model_name]()
    model.to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(seed + 1000 * rank)  # each rank its own data
    batches = [make_batch(device) for _ in range(4)]  # made before timing: not part of a step
    loss_fn = _loss_fn(model_name)
    scope = None
    if mode in EVERY:  # watched from the run's first step: the default schedule's dense start included
        scope = gradscope.watch(model, optimizer=opt, every=EVERY[mode])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def one(i: int) -> None:
        x, y = batches[i % len(batches)]
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scope is not None:
            scope.step(loss)

    for i in range(warmup):
        one(i)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    syncs_ok = None
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        if device.startswith("cuda") and scope is not None and not getattr(scope, "_collecting", True):
            # Non-collected steps must not synchronise the host with the device at all.
            torch.cuda.set_sync_debug_mode("error")
            try:
                one(i)
                syncs_ok = True if syncs_ok is None else syncs_ok
            except RuntimeError:
                syncs_ok = False
                raise
            finally:
                torch.cuda.set_sync_debug_mode(0)
        else:
            one(i)
        sync()
        times.append(time.perf_counter() - t0)
    if scope is not None:
        scope.report()
        scope.close()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return None
    collected = len(scope.history.records) if scope is not None else 0
    return {
        "times": times, "peak_mib": peak, "syncs_ok": syncs_ok, "threads": torch.get_num_threads(),
        "collected": collected,
    }  # fmt: skip


def default_collected(steps: int) -> int:
    """How many of a run's first ``steps`` steps the default schedule collects."""
    from gradscope.config import schedule_for

    schedule = schedule_for(None)  # watch()'s default: dense start, then every 10th, then every 50th
    return sum(schedule(i) for i in range(steps))  # a healthy run: no bursts


def inprocess(model_name: str, blocks: int, steps: int, threads: int | None) -> dict:
    """The cost of one collected step, measured inside one process (no process-to-process noise).

    Blocks of ``steps`` training steps alternate: plain; watched with every=1 (each step collected); and
    watched with a schedule that never collects after step 0 (the cost hooks add to a non-collected
    step). Each watched block gets a fresh scope, closed after; step 0 of each block is not timed.
    """
    import gradscope
    from gradscope.config import Schedule

    _threads(threads)
    torch.manual_seed(0)
    model, make_batch = MODELS[model_name]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [make_batch("cpu") for _ in range(4)]
    loss_fn = _loss_fn(model_name)
    times: dict[str, list[float]] = {"plain": [], "collected": [], "not collected": []}
    per_block: dict[str, list[float]] = {k: [] for k in times}
    every = {"plain": None, "collected": 1, "not collected": Schedule(10**9, 0, 10**9)}
    for b in range(blocks + 1):
        for mode, sched in every.items():
            scope = gradscope.watch(model, optimizer=opt, every=sched) if sched is not None else None
            for i in range(steps + 1):
                x, y = batches[i % len(batches)]
                t0 = time.perf_counter()
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if scope is not None:
                    scope.step(loss)
                if b > 0 and i > 0:  # the first block warms up; step 0 of a scope is always collected
                    times[mode].append(time.perf_counter() - t0)
            if scope is not None:
                scope.close()
            if b > 0:
                per_block[mode].append(statistics.fmean(times[mode][-steps:]))
    # Ratios per block against the plain block of the same round, then the median: drift of a shared
    # machine hits a round's three blocks alike. The spread of these ratios is the noise.
    c = [x / p for x, p in zip(per_block["collected"], per_block["plain"], strict=True)]
    h = [x / p for x, p in zip(per_block["not collected"], per_block["plain"], strict=True)]
    return {
        "plain_ms": statistics.median(per_block["plain"]) * 1e3,
        "collected_extra": statistics.median(c) - 1,
        "hooks_extra": statistics.median(h) - 1,
        "collected_ratios": c,
        "hooks_ratios": h,
    }


def measure(model_name: str, mode: str, args: argparse.Namespace, seed: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", model_name, mode,
        "--steps", str(args.default_steps if mode == "default" else args.steps), "--warmup", str(args.warmup),
        "--device", args.device, "--seed", str(seed), "--threads", str(args.threads or 0),
    ]  # fmt: skip
    env = {**os.environ}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.ddp:  # two ranks on this machine's two cores, one thread each, gloo
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd = launcher + cmd[1:]
        env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn,gpt,nanogpt")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per process (plain, control, every1)")
    parser.add_argument(
        "--default-steps", type=int, default=1000, help="timed steps of the default-schedule process"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp", action="store_true", help="2-process DistributedDataParallel (gloo, CPU)")
    parser.add_argument(
        "--inprocess", action="store_true", help="measure a collected step's cost inside one process"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="process-level modes to run (plain always)")
    parser.add_argument("--quick", action="store_true", help="mlp and nanogpt, 3 rounds, short runs (minutes)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(*args.worker, args.steps, args.warmup, args.device, args.seed, args.threads or None)
        if result is not None:
            print(json.dumps(result), flush=True)
        return
    if args.quick:
        if args.models == parser.get_default("models"):
            args.models = "mlp,nanogpt"
        args.rounds, args.steps, args.default_steps = 3, 30, 200

    threads = args.threads or torch.get_num_threads()
    if args.inprocess:
        blocks, steps = (2, 10) if args.quick else (args.rounds, args.steps)
        print(f"torch {torch.__version__}, cpu, {threads} torch thread(s), in one process, "
              f"{blocks} rounds x {steps} steps per mode, load average before: {load()}")  # fmt: skip
        # A step that is not collected only pays hook calls, so a schedule costs the collected step's
        # extra spread over its share of collected steps, plus the hooks' extra on the others.
        share = default_collected(1000) / 1000
        print("\n| model | plain ms/step | extra per collected step (= every=1) | extra per other step "
              f"| default schedule, 1,000-step run ({share:.1%} collected) |")  # fmt: skip
        print("|---|---|---|---|---|")
        spreads = []
        for model_name in args.models.split(","):
            r = inprocess(model_name, blocks, steps, args.threads or None)
            c, h = r["collected_extra"], r["hooks_extra"]
            default = 1 + share * c + (1 - share) * h
            print(f"| {model_name} | {r['plain_ms']:.1f} | {c:+.1%} | {h:+.2%} | {default:.3f}x |", flush=True)
            spreads.append(
                f"{model_name} per-round ratios: collected "
                + " ".join(f"{x:.3f}" for x in r["collected_ratios"])
                + "; not collected "
                + " ".join(f"{x:.3f}" for x in r["hooks_ratios"])
            )
        print()
        print("\n".join(spreads))
        print(f"load average after: {load()}")
        return
    setup = "2-process DDP (gloo), 1 thread per rank" if args.ddp else f"{threads} torch thread(s) per process"
    print(f"torch {torch.__version__}, device {args.device}, {setup}, {args.rounds} rounds x {args.steps} steps "
          f"(default schedule: {args.default_steps} steps), modes interleaved, one process each, "
          f"load average before: {load()}")  # fmt: skip
    modes = tuple(m for m in MODES if m == "plain" or m in args.modes.split(","))
    rows = []
    for model_name in args.models.split(","):
        per_mode: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.rounds):
            k = r % len(modes)
            order = modes[k:] + modes[:k]  # rotate who goes first
            for mode in order:
                per_mode[mode].append(measure(model_name, mode, args, args.seed + r))
        plain = per_mode["plain"]
        row = {"model": model_name}
        for mode in modes:
            runs = per_mode[mode]
            row[f"{mode}_mean_ms"] = statistics.median(statistics.fmean(x["times"]) * 1e3 for x in runs)
            ratios = [statistics.fmean(x["times"]) / statistics.fmean(p["times"]) for x, p in zip(runs, plain, strict=True)]
            row[f"{mode}_ratio"] = statistics.median(ratios)
            row[f"{mode}_ratios"] = ratios
            row[f"{mode}_peak"] = statistics.median(x["peak_mib"] for x in runs)
            row[f"{mode}_syncs_ok"] = [x["syncs_ok"] for x in runs]
            row[f"{mode}_collected"] = runs[0].get("collected", 0)
        rows.append(row)
        print(f"  {model_name} done, load average {load()}", flush=True)

    unit = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    print()
    print(f"| model | plain ms/step | plain again (noise) | every=1 | default schedule ({args.default_steps} steps) "
          f"| {unit} plain | every=1 | default |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        p = row["plain_peak"]
        cells = [f"{row['plain_mean_ms']:.1f}"]
        cells += [f"{row[f'{m}_mean_ms']:.1f} ms, **{row[f'{m}_ratio']:.3f}x**" if m in modes else "-" for m in MODES[1:]]
        cells += [f"{p:.0f} MiB"] + [f"{row[f'{m}_peak'] / p:.3f}x" if m in modes else "-" for m in MODES[2:]]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")
    print()
    for row in rows:
        spread = "; ".join(f"{m}: " + " ".join(f"{x:.3f}" for x in row[f"{m}_ratios"]) for m in modes[1:])
        print(f"{row['model']} per-round ratios: {spread}")
        if args.device.startswith("cuda"):
            print(f"{row['model']} no host-device sync on non-collected steps: {row.get('default_syncs_ok')}")
    print("ratios: mean step time of a process / that of the same round's plain process; median over rounds")
    print(f"load average after: {load()}")
    if any(math.isnan(r["every1_ratio"]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
