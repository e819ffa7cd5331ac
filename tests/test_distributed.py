"""torch.distributed: one report for the whole job. Two real ranks (torchrun, gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).parent / "workers" / "ddp_run.py"

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


def _torchrun(mode: str, tmp_path: Path) -> tuple[dict, dict, Path]:
    log_dir = tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), mode, str(tmp_path), str(log_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks[0], ranks[1], log_dir


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_rank_gets_the_same_report_of_the_whole_job(mode, tmp_path):
    r0, r1, log_dir = _torchrun(mode, tmp_path)
    assert r0["report"] == r1["report"]
    # Each rank alone sees 7 of 8 units dead (its data wakes one); the job as a whole sees 6 of 8.
    assert r0["report"]["layers"]["1"]["dead_frac"] == pytest.approx(6 / 8)
    dead = [f for f in r0["report"]["findings"] if f["kind"] == "dead_relu"]
    assert [f["layer"] for f in dead] == ["1"]
    assert r0["numel_1"] == 2 * 16 * 8  # elements of both ranks
    # Parameter gradient norms are those of the full (averaged) gradient, on DDP and on FSDP shards alike:
    # a sum of squares over shards, never a sum of norms.
    assert r0["grad_norm_w2"] == pytest.approx(r0["full_grad_norm_w2"], rel=1e-5)
    assert r1["grad_norm_w2"] == pytest.approx(r0["full_grad_norm_w2"], rel=1e-5)
    if mode == "fsdp":
        assert r0["local_grad_norm_w2"] < r0["full_grad_norm_w2"]
        assert r0["local_grad_norm_w2"] ** 2 + r1["local_grad_norm_w2"] ** 2 == pytest.approx(
            r0["full_grad_norm_w2"] ** 2, rel=1e-5
        )
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) >= 3
    # only rank 0 writes files
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert json.loads((log_dir / "gradscope.json").read_text())["findings"] == r0["report"]["findings"]
