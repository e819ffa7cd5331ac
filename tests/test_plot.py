"""`gradscope report LOG_DIR --plot FILE`: the gradient-flow picture (PNG or SVG) drawn from the run's own
event files, and one line with exit 2 when it cannot be drawn (no matplotlib, a bad file name)."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import gradscope
from gradscope.reporters.plot import read_curves
from gradscope_cli.main import cli

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, gradscope.Scope]:
    """A sigmoid stack whose first layers get almost no gradient, watched with every=2."""
    log_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(8):
        layers[f"fc{i}"], layers[f"sig{i}"] = nn.Linear(16, 16), nn.Sigmoid()
    layers["head"] = nn.Linear(16, 3)
    model = nn.Sequential(layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = x[:, :3].argmax(1)
    with gradscope.watch(model, opt, log_dir=log_dir, every=2) as scope:
        for step in range(30):
            i = (torch.arange(32) + 32 * step) % 256
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            opt.step()
            scope.step(loss=loss)
    return log_dir, scope


def test_the_curves_are_the_runs_own_statistics(run: tuple[Path, gradscope.Scope]) -> None:
    log_dir, scope = run
    curves = read_curves(log_dir)
    records = list(scope.history.records)
    fc0 = curves["grad_norm"]["fc0"]
    assert [s for s, _ in fc0] == [r.step for r in records]
    assert [v for _, v in fc0] == pytest.approx([r.gradients["fc0"].norm for r in records], rel=1e-6)
    assert set(curves["update_ratio"]) == {f"fc{i}" for i in range(8)} | {"head"}
    assert [s for s, _ in curves["loss"][""]] == list(range(30))


@pytest.mark.parametrize("ext", [".png", ".svg"])
def test_report_plot_writes_the_picture(run: tuple[Path, gradscope.Scope], tmp_path: Path, ext: str) -> None:
    log_dir, scope = run
    target = tmp_path / f"flow{ext}"
    result = CliRunner().invoke(cli, ["report", str(log_dir), "--plot", str(target)])
    assert result.exit_code == (0 if scope.last_report.ok else 1), result.output
    assert f"gradient-flow picture written to {target}" in result.stderr
    data = target.read_bytes()
    if ext == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    else:
        text = data.decode()
        assert "<svg" in text
        # Text stays text: the axes and the layers with a finding are named in the picture.
        assert "update ‖Δw‖ / ‖w‖ per step" in text and "step" in text
        for f in scope.last_report.findings:
            if f.severity != "info" and f.layer:
                assert f.layer in text


def test_without_matplotlib_one_line_and_exit_2(run: tuple[Path, gradscope.Scope], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # None in sys.modules makes import raise
    result = CliRunner().invoke(cli, ["report", str(run[0]), "--plot", str(tmp_path / "flow.png")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'gradscope[plot]'" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "flow.png").exists()


def test_a_bad_file_name_is_one_line_and_exit_2(run: tuple[Path, gradscope.Scope], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(run[0]), "--plot", str(tmp_path / "flow.jpg")])
    assert result.exit_code == 2 and ".png or .svg" in result.stderr
