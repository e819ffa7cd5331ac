"""Every script in examples/ runs, and gradscope finds in it what the script says it shows."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from gradscope.findings import Report

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> (kind, layer) it demonstrates; None: a healthy run that must raise no warning.
EXPECT: dict[str, tuple[str, str] | None] = {
    "wrap_training_loop": None,
    "nanogpt_char": None,
    "vanishing_gradient": ("vanishing_gradient", "fc0"),
    "exploding_gradient": ("exploding_gradient", "fc1"),
    "dead_relu": ("dead_relu", "act2"),
    "saturated_activation": ("saturated_activation", "act1"),
    "normalization_drift": ("normalization_drift", "bn0"),
    "nonfinite": ("nonfinite", "exp"),
    "unused_parameter": ("unused_parameter", "aux"),
    "not_in_optimizer": ("not_in_optimizer", "fc2"),
    "update_ratio": ("update_ratio", "fc1"),
    "loss_divergence": ("loss_divergence", ""),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_example_is_listed() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(EXPECT)


@pytest.mark.parametrize("name", list(EXPECT))
def test_example(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the scripts write to ./runs/<name>
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "gradscope" in out and "steps seen" in out  # console=True printed the report on close
    report = Report.from_dict(json.loads((tmp_path / "runs" / name / "gradscope.json").read_text()))
    expect = EXPECT[name]
    if expect is None:
        loud = [(f.kind, f.layer, f.message) for f in report.findings if f.severity != "info"]
        assert loud == [] and "✔ Healthy" in out
    else:
        kind, layer = expect
        assert any(f.kind == kind and f.layer == layer for f in report.findings), report.findings
        assert kind in out


def test_wrap_training_loop_runs_as_a_script(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    done = subprocess.run([sys.executable, str(EXAMPLES / "wrap_training_loop.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ok=True" in done.stdout and (tmp_path / "runs" / "wrap_training_loop" / "gradscope.json").exists()
