"""Ranks whose steps differ (rank 0 evaluates alone, a module runs on one rank only) never crash or hang
a watched DDP job, never change its numbers, and still give every rank the same report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
