"""The real `tensorboard` program serves what a watched run wrote: scalars, the layout, the findings.

Loopback only; every wait is bounded; the server is stopped whatever happens.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradscope
from gradscope.reporters.tensorboard import FINDINGS_TAG

RUN = "watched"
START_TIMEOUT_S = 60.0  # import + first load of the logdir on a busy 2-core machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **params: str) -> Any:
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


def _write_run(log_dir: Path) -> gradscope.Report:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    # The middle layer is left out of the optimizer: a run with something to report.
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("2.")], lr=1e-2)
    with gradscope.watch(model, opt, log_dir=log_dir, every=2) as scope:
        for _ in range(30):
            x = torch.randn(32, 6)
            loss = (model(x) - x[:, :1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
    return scope.report()


def test_tensorboard_serves_scalars_layout_and_findings(tmp_path: Path) -> None:
    report = _write_run(tmp_path / RUN)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # The server logs to a file, not a pipe: a full pipe would block it.
    with open(tmp_path / "tensorboard.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1",
             "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            tags: dict[str, Any] = {}
            while time.monotonic() < deadline:
                assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
                try:
                    tags = _get(base, "/data/plugin/scalars/tags")
                    if RUN in tags:
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.5)
            assert RUN in tags, f"tensorboard did not serve the run within {START_TIMEOUT_S}s"

            scalar_tags = set(tags[RUN])
            assert {"loss", "lr/group0", "grad_norm/0", "act_rms/1", "dead_frac/1", "update_ratio/4"} <= scalar_tags
            loss = _get(base, "/data/plugin/scalars/scalars", run=RUN, tag="loss")
            assert [point[1] for point in loss] == list(range(30))  # (wall_time, step, value) for every step

            layout = _get(base, "/data/plugin/custom_scalars/layout")
            charts = {c["title"]: c for cat in layout["category"] for c in cat["chart"]}
            assert charts["grad_norm"]["multiline"]["tag"] == ["^grad_norm/"]
            assert {"act_rms", "dead_frac", "update_ratio", "loss", "lr"} <= set(charts)
            for finding in report.findings:
                assert finding.kind.replace("_", " ") in charts

            text_tag = FINDINGS_TAG + "/text_summary"
            assert text_tag in _get(base, "/data/plugin/text/tags")[RUN]
            served = _get(base, "/data/plugin/text/text", run=RUN, tag=text_tag)[-1]["text"]
            if report.findings:
                for finding in report.findings:
                    assert finding.kind in served
            else:
                assert "No findings after 30 steps" in served
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
