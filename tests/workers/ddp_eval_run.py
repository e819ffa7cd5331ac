"""Run by torchrun in tests/test_distributed_eval.py: two ranks whose steps are not alike.

Rank 0 alone evaluates every few steps (under no_grad, and in eval() mode with grad enabled, which measures
activations on rank 0 only), and an auxiliary module runs on rank 0 only on odd steps. The same job runs
twice, unwatched and watched; each rank writes its losses, final weights and report.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import gradscope


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh()
        )
        self.aux = nn.Sequential(nn.Linear(16, 16), nn.ReLU())  # rank 0 only, odd steps only
        self.head = nn.Linear(16, 1)
        self.use_aux = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.use_aux:
            h = h + self.aux(h)
        return self.head(h)


def run(rank: int, watched: bool, log_dir: str | None) -> dict:
    torch.manual_seed(0)
    net = Net()
    model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = (
        gradscope.watch(model, optimizer=opt, every=1, histograms=True, log_dir=log_dir) if watched else None
    )
    g = torch.Generator().manual_seed(10 + rank)
    losses = []
    for step in range(8):
        net.use_aux = rank == 0 and step % 2 == 1
        x = torch.randn(12, 6, generator=g)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scope is not None:
            scope.step(loss)
        losses.append(loss.item())
        net.use_aux = False
        if rank == 0 and step % 3 == 2:  # the usual `if rank == 0: evaluate()`, on the bare module
            net.eval()
            with torch.no_grad():
                net(torch.randn(32, 6, generator=g))
            net(torch.randn(4, 6, generator=g))  # eval() with grad enabled, never backpropagated
            net.train()
    out = {
        "losses": losses,
        "weights": {k: v.flatten().tolist() for k, v in net.state_dict().items()},
    }
    if scope is not None:
        report = scope.report()
        out["report"] = report.to_dict()
        out["aux_steps"] = [r.step for r in scope.history.records if "aux.0" in r.activations]
        out["aux_numel"] = [
            r.activations["aux.0"].numel for r in scope.history.records if "aux.0" in r.activations
        ]
        out["body_numel"] = scope.history.last.activations["body.0"].numel
        out["eval_norms"] = sorted({k for r in scope.history.records for k in r.eval_norms})
        out["samples"] = scope.history.last.activations["body.0"].sample is not None
        out["steps"] = scope.history.steps_seen
        scope.close()
    return out


def main() -> None:
    out_dir, log_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a mismatched collective fails fast
    rank = dist.get_rank()
    facts = {"plain": run(rank, False, None), "watched": run(rank, True, log_dir)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(facts, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see ddp_run.py: gloo's threads can race the interpreter's teardown


if __name__ == "__main__":
    main()
