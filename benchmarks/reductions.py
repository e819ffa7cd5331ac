"""One output tensor's statistics, three ways: the previous eager ops, the fused pass in pieces that
gradscope uses, and the same statistics compiled with ``torch.compile(dynamic=True)``.

    python benchmarks/reductions.py            # sizes of the benchmark models' outputs, fp32 and bf16
    python benchmarks/reductions.py --quick    # two sizes, no bf16 (a minute, most of it the compile)
    python benchmarks/reductions.py --no-compile

Times are the best of several repeats (microseconds per call, one torch thread); the compile's first-call
latency is reported separately, and which path ran (compiled, or the eager fallback when compilation
fails, e.g. without a C++ compiler).
"""

from __future__ import annotations

import argparse
import time

import torch

from gradscope.stats import reductions as R


def previous(x: torch.Tensor, band: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The implementation before the fused pass (a full fp32 copy, five to eight passes, full-size temporaries)."""
    flat = x.detach().reshape(-1)
    flat = flat if flat.dtype == torch.float32 else flat.float()
    lo, hi = torch.aminmax(flat)
    sumsq = torch.dot(flat, flat)
    sign = torch.sign(flat)
    balance = sign.sum()
    nonzero = sign.abs_().sum()
    slots = [flat.sum(), sumsq, nonzero, sumsq.new_zeros(()), (nonzero - balance) / 2]
    if band is not None:
        mid, half = (band[0] + band[1]) / 2, (band[1] - band[0]) / 2
        slots.append((flat - mid).abs_().ge_(half).sum())
    return torch.stack(slots), torch.stack([hi, -lo])


def fused_eager(x: torch.Tensor, mid: float, half: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics written as whole-tensor ops, for the compiler to fuse into one loop."""
    c = x.float()
    nonfinite = (~torch.isfinite(c)).sum()
    sums = torch.stack(
        [c.sum(), (c * c).sum(), (c != 0).sum().float(), nonfinite.float(), (c < 0).sum().float(),
         ((c - mid).abs() >= half).sum().float()]
    )  # fmt: skip
    return sums, torch.stack([c.amax(), -c.amin()])


def best_us(fn, repeats: int = 5, inner: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    band = (-0.9747, 0.9747)
    mid, half = 0.0, 0.9747
    shapes = [(128, 512), (32, 64, 32, 32)] if args.quick else [(128, 512), (12, 64, 512), (32, 64, 32, 32), (4, 256, 50257)]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    compiled = None
    path = "not measured (--no-compile)"
    compile_s = float("nan")
    if not args.no_compile:
        compiled = torch.compile(fused_eager, dynamic=True)
        t0 = time.perf_counter()
        try:
            compiled(torch.randn(64, 64), mid, half)
            path = "compiled (inductor)"
        except Exception as exc:  # no C++ compiler, or inductor failed: the eager fallback
            compiled, path = None, f"eager fallback ({type(exc).__name__})"
        compile_s = time.perf_counter() - t0
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"torch {torch.__version__}, 1 thread, load average {load}; torch.compile path: {path}, "
          f"first call {compile_s:.1f} s")  # fmt: skip
    print("\n| shape | dtype | previous eager | fused pass (gradscope) | torch.compile | ns/element fused |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        for dtype in dtypes:
            x = torch.randn(shape).to(dtype)
            inner = 1 if x.numel() > 10**7 else 5
            old = best_us(lambda x=x: previous(x, band), inner=inner)
            new = best_us(lambda x=x: R.activation_stats(x, band=band, count_neg=True), inner=inner)
            comp = "-"
            if compiled is not None:
                t0 = time.perf_counter()
                compiled(x, mid, half)  # a new rank or dtype recompiles: not part of the steady state
                recompile = time.perf_counter() - t0
                comp = f"{best_us(lambda x=x: compiled(x, mid, half), inner=inner):.0f} us (first call {recompile:.1f} s)"
            name = str(dtype).replace("torch.", "")
            print(f"| {tuple(shape)} | {name} | {old:.0f} us | {new:.0f} us | {comp} | {new * 1e3 / x.numel():.2f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
