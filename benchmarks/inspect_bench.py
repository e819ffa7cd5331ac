"""Benchmark `gradscope inspect` at checkpoint scale: peak memory and throughput on a ~2 GB fp32 checkpoint.

Generates a transformer-shaped fp32 state_dict of about 2 GB and its safetensors twin in a temporary
directory, then measures, each in a fresh subprocess so that no run inherits another's memory:

- ``gradscope.inspect_checkpoint`` on the torch.save file and on the .safetensors file;
- a plain ``torch.load(weights_only=True)`` of the same .pt file, for comparison (it only loads;
  gradscope also analyzes every tensor). ``safetensors.torch.load_file`` is left out: it maps the file
  lazily and returns before reading anything, so its time says nothing.

Peak RSS is measured above the worker's own baseline after its imports (Linux: ``VmHWM`` reset through
``/proc/self/clear_refs``). "warm" runs read files that are in the page cache (just written); "cold" runs
first evict the file from the page cache with ``posix_fadvise(DONTNEED)``, which touches only that file.
The files are deleted at the end unless ``--keep``.

    .venv/bin/python benchmarks/inspect_bench.py            # ~2 GB, prints a Markdown table
    .venv/bin/python benchmarks/inspect_bench.py --size-gb 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKERS = ("gradscope", "torch.load")


def layout(size_gb: float) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a GPT-like model (d=1536) with enough blocks for ``size_gb`` of fp32."""
    d, vocab = 1536, 40000
    block = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
             "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
             "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d),
             "mlp.fc2.bias": (d,)}
    per_block = sum(_numel(s) for s in block.values()) * 4
    blocks = max(1, math.ceil((size_gb * 1e9 - vocab * d * 4) / per_block))  # at least size_gb
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (vocab, d)}
    for i in range(blocks):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def generate(folder: Path, size_gb: float) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in layout(size_gb).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            state[name] = torch.ones(shape)
        elif len(shape) == 1:
            state[name] = torch.zeros(shape)
        else:
            state[name] = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
    pt, st = folder / "model.pt", folder / "model.safetensors"
    torch.save(state, pt)
    save_file(state, st)
    return pt, st


# --- worker (one measurement per process) -------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(kind: str, path: str, cold: bool) -> dict[str, float]:
    import torch

    import gradscope

    if cold:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS: the baseline is after imports
    except OSError:
        pass
    base = _status("VmRSS")
    start = time.perf_counter()
    if kind == "gradscope":
        report = gradscope.inspect_checkpoint(path)
        assert report.layers
    elif kind == "torch.load":
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_above_base": _status("VmHWM") - base, "base": base}


def measure(kind: str, path: Path, cold: bool) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, str(path)] + (["--cold"] if cold else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.cold)))
        return
    if args.generate:
        generate(Path(args.generate), args.size_gb)
        return

    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="gradscope-bench-"))
    try:
        t0 = time.perf_counter()
        # Generated in its own process, so that this one stays small and the files' pages are all written.
        subprocess.run([sys.executable, __file__, "--generate", str(folder), "--size-gb", str(args.size_gb)],
                       check=True)
        pt, st = folder / "model.pt", folder / "model.safetensors"
        size = pt.stat().st_size
        print(f"generated {size / 1e9:.2f} GB ({len(layout(args.size_gb))} tensors) + safetensors twin "
              f"in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs; load average "
              f"{os.getloadavg()[0]:.1f} before the runs", file=sys.stderr)
        runs = [("plain torch.load", "torch.load", pt), ("gradscope inspect", "gradscope", pt),
                ("gradscope inspect", "gradscope", st)]
        print("| file | what | cache | seconds | throughput | peak RSS above baseline |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for cold in (False, True):
            for label, kind, path in runs:
                r = measure(kind, path, cold)
                mbps = path.stat().st_size / r["seconds"] / 1e6
                print(f"| {path.suffix} | {label} | {'cold' if cold else 'warm'} | {r['seconds']:.2f} | "
                      f"{mbps:,.0f} MB/s | {r['peak_above_base'] / 2**20:,.0f} MiB |", flush=True)
    finally:
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
