"""`gradscope report` and `gradscope demo` through click's CliRunner: exit status and output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradscope
from gradscope.findings import Finding, Report
from gradscope.reporters.json import JSON_NAME, write_json
from gradscope_cli.main import cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log_dir of a small real watched run."""
    torch.manual_seed(0)
    log_dir = tmp_path_factory.mktemp("run")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, opt, log_dir=log_dir, every=1) as scope:
        for _ in range(6):
            x = torch.randn(16, 4)
            loss = (model(x) - x[:, :1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss=loss)
    return log_dir


def test_report_renders_a_run(run_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(run_dir)], terminal_width=100)
    saved = json.loads((run_dir / JSON_NAME).read_text())
    assert result.exit_code == (0 if Report.from_dict(saved).ok else 1), result.output
    assert "gradscope" in result.output and "6 steps seen" in result.output
    assert "Gradient flow" in result.output and "Linear" in result.output and "ReLU" in result.output
    assert "\x1b[" not in result.output  # not a terminal: no colour codes


def test_report_json_is_the_saved_document(run_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--json"])
    data = json.loads(result.stdout)
    saved = json.loads((run_dir / JSON_NAME).read_text())
    assert data == saved
    assert data["version"] == 1 and data["steps"] == 6 and set(data["layers"]) == {"0", "1", "2"}


def test_report_exit_1_on_a_critical_finding(tmp_path: Path) -> None:
    crit = Finding("nonfinite", "critical", "fc1", 3, "NaN first appeared in fc1.", "Check the input data.")
    write_json(Report(findings=[crit], steps=10, layers={"fc1": {"type": "Linear"}}), tmp_path / JSON_NAME)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)], terminal_width=100)
    assert result.exit_code == 1
    assert "NaN first appeared in fc1." in result.output and "CRIT" in result.output
    as_json = CliRunner().invoke(cli, ["report", str(tmp_path), "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["findings"][0]["kind"] == "nonfinite"


@pytest.mark.parametrize("case", ["missing", "empty", "foreign", "garbage"])
def test_report_exit_2_with_one_line(tmp_path: Path, case: str) -> None:
    target = tmp_path / "run"
    if case != "missing":
        target.mkdir()
    if case == "foreign":
        (target / JSON_NAME).write_text(json.dumps({"hello": "world"}))
    if case == "garbage":
        (target / JSON_NAME).write_text("{not json")
    result = CliRunner().invoke(cli, ["report", str(target)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradscope: error:") and str(target) in lines[0]
    assert "Traceback" not in result.stderr


def test_demo_runs_every_scenario_and_diagnoses_each(tmp_path: Path) -> None:
    import zoo

    from gradscope.demo import DEMO

    result = CliRunner().invoke(cli, ["demo", "--log-dir", str(tmp_path)], terminal_width=100)
    assert result.exit_code == 0, result.output
    out = result.output
    for name in DEMO:
        expect = zoo.build(name).expect
        assert f"✔ {name}" in out, f"{name} was not diagnosed as expected:\n{out}"
        saved = Report.from_dict(json.loads((tmp_path / name / JSON_NAME).read_text()))
        if expect is None:
            assert all(f.severity == "info" for f in saved.findings)
        else:
            kind, layer = expect
            assert f"{kind} at {layer}" in out  # the brief leads with the expected finding
            assert any(f.kind == kind and f.layer == layer for f in saved.findings)
        assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / name).iterdir())
    assert f"{len(DEMO)} of {len(DEMO)} scenarios diagnosed as expected" in out
    assert "no findings" in out  # the healthy control
    assert out.rstrip().endswith(f"tensorboard --logdir {tmp_path}")


def test_demo_default_log_dir_and_scenario_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["demo", "--scenario", "not_in_optimizer"], terminal_width=100)
    assert result.exit_code == 0, result.output  # a critical finding in the demo is not a failure of the demo
    assert "1 of 1 scenarios diagnosed as expected" in result.output
    assert "tensorboard --logdir gradscope-demo" in result.output
    report = CliRunner().invoke(cli, ["report", "gradscope-demo/not_in_optimizer"])
    assert report.exit_code == 1 and "not_in_optimizer" in report.output
    bad = CliRunner().invoke(cli, ["demo", "--scenario", "nope"])
    assert bad.exit_code == 2


def test_report_file_is_the_reports_dict_and_the_cli_shows_the_run(tmp_path):
    import json as _json

    import torch
    from click.testing import CliRunner
    from torch import nn

    import gradscope
    from gradscope_cli.main import cli

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, optimizer=opt, every=2, log_dir=tmp_path) as scope:
        for _ in range(12):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scope.step(loss)
    on_disk = _json.loads((tmp_path / "gradscope.json").read_text())
    assert on_disk == scope.last_report.to_dict()
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    first = scope.history.losses[0][1]
    assert f"{first:.3g}"[:4] in result.output  # the loss curve came from the summary beside it
    as_json = CliRunner().invoke(cli, ["report", str(tmp_path), "--json"])
    assert _json.loads(as_json.output) == on_disk
