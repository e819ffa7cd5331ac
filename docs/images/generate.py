"""Regenerate the pictures of docs/ and the README from real runs (nothing here is drawn by hand).

    .venv/bin/python docs/images/generate.py            # terminal SVGs (a few seconds)
    .venv/bin/python docs/images/generate.py --screenshot   # also the TensorBoard screenshot (needs chromium)

- demo.svg: the output of `gradscope demo`, as rich renders it in a 100-column terminal.
- report.svg: the full terminal report of the vanishing-gradient demo scenario (`gradscope report`).
- gradient-flow.png: `gradscope report gradscope-demo/vanishing_sigmoid --plot gradient-flow.png`.
- tensorboard.png, tensorboard-findings.png: TensorBoard's Custom Scalars dashboard and the findings
  table (Text tab) of the exploding_lr demo run, in headless Chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from rich.console import Console

from gradscope.findings import Report
from gradscope.reporters.json import JSON_NAME, read_summary
from gradscope.reporters.plot import write_plot
from gradscope.reporters.terminal import render_report
from gradscope_cli.demo_cmd import show_demo

HERE = Path(__file__).resolve().parent
WIDTH = 100


def terminal_pictures(log_dir: Path) -> None:
    torch.set_num_threads(1)
    console = Console(record=True, width=WIDTH, file=open(os.devnull, "w"), force_terminal=True)  # noqa: SIM115
    show_demo(console, str(log_dir))
    console.save_svg(str(HERE / "demo.svg"), title="gradscope demo")

    run = log_dir / "vanishing_sigmoid"
    report = Report.from_dict(json.loads((run / JSON_NAME).read_text()))
    console = Console(record=True, width=WIDTH, file=open(os.devnull, "w"), force_terminal=True)  # noqa: SIM115
    render_report(report, console, summary=read_summary(run / JSON_NAME))  # as `gradscope report` does
    console.save_svg(str(HERE / "report.svg"), title="gradscope report gradscope-demo/vanishing_sigmoid")
    write_plot(report, run, HERE / "gradient-flow.png")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(log_dir: Path, run: str = "exploding_lr") -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found (Debian: apt-get install chromium)")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir_spec", f"{run}:{log_dir / run}", "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=2) as r:
                    if json.loads(r.read()):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        for page, picture in (("custom_scalars", "tensorboard.png"), ("text", "tensorboard-findings.png")):
            _capture(chromium, f"http://127.0.0.1:{port}/#{page}", HERE / picture)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _capture(chromium: str, url: str, out: Path, size: str = "1400,1000") -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={size}",
             "--virtual-time-budget=20000", f"--screenshot={out}", url],
            check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # so the pictures show the demo's default, relative log_dir
        log_dir = Path("gradscope-demo")
        terminal_pictures(log_dir)
        if args.screenshot:
            screenshot(log_dir.resolve())


if __name__ == "__main__":
    main()
