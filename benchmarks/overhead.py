"""Overhead of gradscope on real training steps: plain vs watched, side by side in one run.

Each (model, mode) measurement runs in its own process; rounds interleave the modes so that drift of
the machine (thermal, other load) hits all of them alike. The ratio to plain is computed per round from
the mean step time over the same number of steps, then the median over rounds is reported.

    python benchmarks/overhead.py                 # all models, CPU
    python benchmarks/overhead.py --device cuda   # the same on a GPU (also counts host-device syncs)
    python benchmarks/overhead.py --models mlp --rounds 5
    python benchmarks/overhead.py --ddp             # 2-process DDP on CPU (gloo) vs plain DDP
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
MODES = ("plain", "control", "every1", "every10", "every50")
EVERY = {"every1": 1, "every10": 10, "every50": 50}


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


MODELS = {"mlp": mlp, "cnn": cnn, "gpt": gpt}


# --- one measurement, in its own process ---------------------------------------------------------------
def worker(model_name: str, mode: str, steps: int, warmup: int, device: str, seed: int) -> dict | None:
    import gradscope

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
    if model_name == "gpt":
        loss_fn = lambda out, y: nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
    else:
        loss_fn = lambda out, y: nn.functional.mse_loss(out, y)  # noqa: E731
    scope = None
    if mode in EVERY:
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
        if device.startswith("cuda") and scope is not None and not scope._collecting:
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
    return {"times": times, "peak_mib": peak, "syncs_ok": syncs_ok}


def inprocess(model_name: str, blocks: int, steps: int) -> dict:
    """The cost of one collected step, measured inside one process (no process-to-process noise).

    Blocks of ``steps`` training steps alternate: plain; watched with every=1 (each step collected); and
    watched with a schedule that never collects after step 0 (the cost hooks add to a non-collected
    step). Each watched block gets a fresh scope, closed after; step 0 of each block is not timed.
    """
    import gradscope
    from gradscope.config import Schedule

    torch.manual_seed(0)
    model, make_batch = MODELS[model_name]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [make_batch("cpu") for _ in range(4)]
    if model_name == "gpt":
        loss_fn = lambda out, y: nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
    else:
        loss_fn = nn.functional.mse_loss
    times: dict[str, list[float]] = {"plain": [], "collected": [], "not collected": []}
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
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    return {
        "plain_ms": mean["plain"] * 1e3,
        "collected_extra": mean["collected"] / mean["plain"] - 1,
        "hooks_extra": mean["not collected"] / mean["plain"] - 1,
    }


def measure(model_name: str, mode: str, args: argparse.Namespace, seed: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", model_name, mode,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--seed", str(seed),
    ]  # fmt: skip
    env = {**os.environ}
    if args.ddp:  # two ranks on this machine's two cores, one thread each, gloo
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd = launcher + cmd[1:]
        env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn,gpt")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per process (a multiple of 50)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp", action="store_true", help="2-process DistributedDataParallel (gloo, CPU)")
    parser.add_argument(
        "--inprocess", action="store_true", help="measure a collected step's cost inside one process"
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(*args.worker, args.steps, args.warmup, args.device, args.seed)
        if result is not None:
            print(json.dumps(result), flush=True)
        return

    if args.inprocess:
        print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, in one process, "
              f"{args.rounds} blocks x {args.steps} steps per mode")  # fmt: skip
        # A step that is not collected only pays hook calls (noise-level here), so every=N costs the
        # collected step's extra, spread over N steps.
        print("\n| model | plain ms/step | extra per collected step (= every=1) | extra per other step "
              "| every=10: 1 + extra/10 | every=50: 1 + extra/50 |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for model_name in args.models.split(","):
            r = inprocess(model_name, args.rounds, args.steps)
            c, h = r["collected_extra"], r["hooks_extra"]
            print(f"| {model_name} | {r['plain_ms']:.1f} | {c:+.1%} | {h:+.2%} | "
                  f"{1 + c / 10:.3f}x | {1 + c / 50:.3f}x |")  # fmt: skip
        return
    setup = "2-process DDP (gloo), 1 thread per rank" if args.ddp else f"threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, device {args.device}, {setup}, "
          f"{args.rounds} rounds x {args.steps} steps, modes run interleaved, one process each")  # fmt: skip
    rows = []
    for model_name in args.models.split(","):
        per_mode: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            k = r % len(MODES)
            order = MODES[k:] + MODES[:k]  # rotate who goes first
            for mode in order:
                per_mode[mode].append(measure(model_name, mode, args, args.seed + r))
        plain = per_mode["plain"]
        row = {"model": model_name}
        for mode in MODES:
            runs = per_mode[mode]
            row[f"{mode}_ms"] = statistics.median(statistics.median(x["times"]) * 1e3 for x in runs)
            row[f"{mode}_mean_ms"] = statistics.median(statistics.fmean(x["times"]) * 1e3 for x in runs)
            ratios = [statistics.fmean(x["times"]) / statistics.fmean(p["times"]) for x, p in zip(runs, plain, strict=True)]
            row[f"{mode}_ratio"] = statistics.median(ratios)
            row[f"{mode}_ratios"] = ratios
            row[f"{mode}_peak"] = statistics.median(x["peak_mib"] for x in runs)
            row[f"{mode}_syncs_ok"] = [x["syncs_ok"] for x in runs]
        rows.append(row)

    unit = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    print()
    print(f"| model | plain ms/step | plain again (noise) | every=1 | every=10 (default, steps < 200) "
          f"| every=50 (default, later) | {unit} plain | every=1 | every=10 | every=50 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        p = row["plain_peak"]
        cells = [f"{row['plain_mean_ms']:.1f}"]
        cells += [f"{row[f'{m}_mean_ms']:.1f} ms, **{row[f'{m}_ratio']:.3f}x**" for m in MODES[1:]]
        cells += [f"{p:.0f} MiB"] + [f"{row[f'{m}_peak'] / p:.3f}x" for m in MODES[2:]]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")
    print()
    for row in rows:
        spread = "; ".join(f"{m}: " + " ".join(f"{x:.3f}" for x in row[f"{m}_ratios"]) for m in MODES[1:])
        print(f"{row['model']} per-round ratios: {spread}")
        if args.device.startswith("cuda"):
            print(f"{row['model']} no host-device sync on non-collected steps: {row['every10_syncs_ok']}")
    print("ratios: mean step time of a process / that of the same round's plain process; median over rounds")
    if any(math.isnan(r["every1_ratio"]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
