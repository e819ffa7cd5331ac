"""Run by torchrun in tests/test_distributed.py: two ranks, each seeing half of the data.

Layer "1" (a ReLU) has two live units, each alive on one rank's data only, and six dead ones: only the
combined statistics show that 6 of 8 units are dead; each rank alone would see 7 of 8.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import gradscope


def build() -> nn.Module:
    torch.manual_seed(0)
    first = nn.Linear(4, 8)
    with torch.no_grad():
        first.weight.zero_()
        first.bias.fill_(-10.0)
        first.weight[0, 0], first.bias[0] = 1.0, 0.0  # alive when x0 > 0 (rank 0's data)
        first.weight[1, 0], first.bias[1] = -1.0, 0.0  # alive when x0 < 0 (rank 1's data)
    first.requires_grad_(False)
    return nn.Sequential(first, nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 1))


def main() -> None:
    mode, out_dir, log_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[2])
        fully_shard(model)
        wrapped = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.01)
    scope = gradscope.watch(wrapped, optimizer=opt, every=1, log_dir=log_dir)
    g = torch.Generator().manual_seed(100 + rank)
    sign = 1.0 if rank == 0 else -1.0
    for _ in range(4):
        x = torch.randn(16, 4, generator=g)
        x[:, 0] = sign * x[:, 0].abs()
        loss = wrapped(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss)
    report = scope.report()
    rec = scope.history.last
    facts = {
        "report": report.to_dict(),
        "numel_1": rec.activations["1"].numel,
        "grad_norm_w2": rec.params["2.weight"].grad_norm,
        "local_grad_norm_w2": float(gradscope.distributed.local(model[2].weight.grad).norm()),
        "full_grad_norm_w2": _full_norm(model[2].weight.grad),
        "update_w2": rec.params["2.weight"].update_norm,
        "losses": list(scope.history.losses),
    }
    scope.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)
    dist.barrier()
    dist.destroy_process_group()
    # Gloo's background threads can race the interpreter's teardown and abort ("terminate called without an
    # active exception") after everything above is done; leave without running C++ static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _full_norm(t: torch.Tensor) -> float:
    if hasattr(t, "full_tensor"):
        return float(t.full_tensor().norm())
    return float(t.norm())


if __name__ == "__main__":
    main()
