"""Ranks whose steps differ (rank 0 evaluates alone, a module runs on one rank only) never crash or hang
a watched DDP job, never change its numbers, and still give every rank the same report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).parent / "workers" / "ddp_eval_run.py"

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


def test_rank_local_evaluations_and_modules_stay_out_of_the_collective(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), str(tmp_path), str(tmp_path / "logs"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for rank in (r0, r1):  # watching changed no number of training
        assert rank["watched"]["losses"] == rank["plain"]["losses"]
        assert rank["watched"]["weights"] == rank["plain"]["weights"]
    w0, w1 = r0["watched"], r1["watched"]
    assert w0["steps"] == w1["steps"] == 8
    assert w0["report"] == w1["report"]
    # the rank-0-only module is in both ranks' records, with rank 0's elements only (12 rows x 16 units)
    assert w0["aux_steps"] == w1["aux_steps"] == [1, 3, 5, 7]
    assert w0["aux_numel"] == w1["aux_numel"] == [12 * 16] * 4
    assert w0["body_numel"] == w1["body_numel"] == 2 * 12 * 16  # training elements of both ranks
    # evaluation statistics and histogram samples stay on the rank that made them
    assert w0["eval_norms"] == ["body.1"] and w1["eval_norms"] == []
    assert w0["samples"] and w1["samples"]


class _TwoRanks:
    """Stands in for torch.distributed in one process, as rank 0 of two; rank 1 packed ``other``."""

    def __init__(self, other, combiner) -> None:
        self.other = [e for e in other.entries.values() if e.combine != "local"]
        self.tensors = other.tensors
        self.combiner = combiner

    def all_gather(self, out, t, group=None):
        out[0].copy_(t)
        if t.dtype == torch.int64:  # the layout check
            out[1].copy_(self.combiner.layout_id(self.other, t.device))
            return
        # the buffer: rank 1 packs the agreed layout, [sums | maxes], identities where it measured nothing
        agreed = sorted(self.combiner.last_agreed, key=lambda e: e.combine != "sum")
        vals = [self.tensors.get(e.key, torch.full((e.size,), e.identity())) for e in agreed]
        out[1].copy_(torch.cat(vals))

    def all_gather_object(self, out, obj, group=None):
        out[0] = obj
        out[1] = [(tuple(e.key), e.combine, e.size, e.names) for e in self.other]


def test_ranks_that_packed_different_statistics_combine_the_union_and_keep_conflicts_local():
    from gradscope.stats.collector import Combiner
    from gradscope.stats.packing import Key, Pack

    mine, other = Pack(), Pack()
    mine.put(Key("act", "a", "sums"), "sum", torch.tensor([1.0, 2.0]), ("sum", "sumsq"))
    mine.put(Key("act", "only_here", "maxes"), "max", torch.tensor([5.0]))
    mine.put(Key("act", "w", "alive"), "max", torch.tensor([1.0, 0.0, 1.0]))  # 3 units here, 2 there
    mine.put(Key("act", "a", "sample"), "local", torch.tensor([0.5, 0.25]))
    other.put(Key("act", "a", "sums"), "sum", torch.tensor([10.0, 20.0]), ("sum", "sumsq"))
    other.put(Key("act", "only_there", "sums"), "sum", torch.tensor([7.0]))
    other.put(Key("act", "w", "alive"), "max", torch.tensor([1.0, 1.0]))
    combiner = Combiner.__new__(Combiner)
    combiner.dist, combiner.world, combiner.group, combiner.device = _TwoRanks(other, combiner), 2, None, None
    conflicts: list = []
    combiner.on_disagree = conflicts.append
    values = mine.transfer(combiner)
    assert values.named(Key("act", "a", "sums")) == {"sum": 11.0, "sumsq": 22.0}
    assert values.get(Key("act", "only_there", "sums")).tolist() == [7.0]  # measured on the other rank only
    assert values.get(Key("act", "only_here", "maxes")).tolist() == [5.0]
    assert values.get(Key("act", "w", "alive")).tolist() == [1.0, 0.0, 1.0]  # sizes disagree: this rank's own
    assert values.get(Key("act", "a", "sample")).tolist() == [0.5, 0.25]  # never combined
    assert conflicts == [{Key("act", "w", "alive")}]
