"""`gradscope inspect` end to end: exit statuses, one-line errors, stdout purity, safety, log_dir."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gradscope
from gradscope_cli.main import cli


def run(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args], terminal_width=120)


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def assert_one_line_error(result, *phrases: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for phrase in phrases:
        assert phrase in lines[0]


class Evil:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --- safety -------------------------------------------------------------------------------------------


def test_malicious_pickle_never_runs_even_from_the_console_script(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Evil(marker)}, path)
    before = fingerprint(path)
    proc = subprocess.run([sys.executable, "-m", "gradscope_cli.main", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert not marker.exists()
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(path) in proc.stderr and "would run code" in proc.stderr and "--trust-pickle" in proc.stderr
    assert fingerprint(path) == before


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_in_process(tmp_path, how):
    import pickle

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.bin"
    if how == "torch.save":
        torch.save({"w": Evil(marker)}, path)
    else:
        with path.open("wb") as f:
            pickle.dump({"w": Evil(marker)}, f)
    assert_one_line_error(run(str(path)), str(path), "would run code from the file")
    assert not marker.exists()


def write_bad(tmp_path: Path, case: str) -> Path:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    path = tmp_path / f"{case}.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "random":
        path.write_bytes(os.urandom(4096))
    elif case == "text":
        path.write_text("epoch,loss\n1,0.5\n2,0.4\n")
    elif case == "not_tensors":
        torch.save({"epoch": 3, "names": ["a", "b"], "lr": 0.1}, path)
    elif case == "directory":
        path.mkdir()
        (path / "README.md").write_text("no weights here")
    return path


@pytest.mark.parametrize(("case", "phrase"), [
    ("empty", "file is empty"),
    ("truncated", "truncated or corrupt"),
    ("random", "not a checkpoint"),
    ("text", "not a checkpoint"),
    ("not_tensors", "holds no tensors"),
    ("directory", "a directory without model.safetensors.index.json"),
])
def test_bad_input_is_one_line_exit_2_and_the_file_is_untouched(tmp_path, case, phrase):
    path = write_bad(tmp_path, case)
    before = fingerprint(path) if path.is_file() else None
    assert_one_line_error(run(str(path)), str(path), phrase)
    if before is not None:
        assert fingerprint(path) == before


def test_nonexistent_path(tmp_path):
    assert_one_line_error(run(str(tmp_path / "nope.pt")), "nope.pt", "no such file")


def test_missing_safetensors_package_says_what_to_install(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(4, 4)}, tmp_path / "m.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors → ImportError
    assert_one_line_error(run(str(tmp_path / "m.safetensors")), "m.safetensors", "pip install 'gradscope[safetensors]'")


def test_corrupt_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(16, 16)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    assert_one_line_error(run(str(path)), str(path), "corrupt safetensors file")


def test_trust_pickle_warns_that_it_runs_code(tmp_path):
    torch.save(nn.Linear(4, 2), tmp_path / "full.pt")  # a whole module: needs full unpickling
    assert_one_line_error(run(str(tmp_path / "full.pt")), "--trust-pickle")
    result = run(str(tmp_path / "full.pt"), "--trust-pickle", "--json")
    assert result.exit_code == 0
    assert "runs code from the file" in result.stderr
    assert set(json.loads(result.stdout)["layers"][""]["tensors"]) == {"weight", "bias"}


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["--model", "pkg:build"],  # a probe needs --input-shape too
    ["--input-shape", "8,3"],
])
def test_usage_mistakes_are_one_line(tmp_path, args):
    torch.save({"w": torch.randn(3)}, tmp_path / "m.pt")
    assert_one_line_error(run(str(tmp_path / "m.pt"), *args))


def test_missing_path_argument_is_one_line():
    assert_one_line_error(run(), "PATH")


# --- output -------------------------------------------------------------------------------------------


def nan_state() -> dict[str, torch.Tensor]:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["2.weight"][0, 0] = float("nan")
    return state


def test_json_is_the_report_and_nothing_else_and_critical_exits_1(tmp_path):
    torch.save(nan_state(), tmp_path / "nan.pt")
    result = run(str(tmp_path / "nan.pt"), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc == gradscope.inspect_checkpoint(tmp_path / "nan.pt").to_dict()
    assert doc["version"] == 1 and doc["steps"] == 0
    [f] = doc["findings"]
    assert (f["kind"], f["severity"], f["layer"], f["step"]) == ("nonfinite", "critical", "2", None)
    row = doc["layers"]["2"]["tensors"]["weight"]
    assert row["shape"] == [2, 16] and row["dtype"] == "float32" and row["nonfinite"] == 1
    assert row["rms"] == "nan"  # JSON-safe, still readable


def test_terminal_report_shows_findings_and_the_per_layer_table(tmp_path):
    torch.save(nan_state(), tmp_path / "nan.pt")
    result = run(str(tmp_path / "nan.pt"))
    assert result.exit_code == 1
    out = result.stdout
    assert "nonfinite" in out and "1 NaN" in out
    for column in ("shape", "dtype", "RMS", "abs-max", "σ≈", "zeros"):
        assert column in out
    assert "0.weight" in out and "16×8" in out and "float32" in out


def test_healthy_checkpoint_exits_0(tmp_path):
    torch.save(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).state_dict(), tmp_path / "ok.pt")
    result = run(str(tmp_path / "ok.pt"))
    assert result.exit_code == 0, result.stderr
    assert "Healthy" in result.stdout


def test_log_dir_gets_weight_histograms_and_the_report(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.save(nan_state(), tmp_path / "nan.pt")
    logs = tmp_path / "logs"
    result = run(str(tmp_path / "nan.pt"), "--log-dir", str(logs), "--json")
    assert result.exit_code == 1
    saved = json.loads((logs / "gradscope.json").read_text())
    assert saved == json.loads(result.stdout)
    assert not [p for p in logs.iterdir() if p.name.endswith(".tmp")]
    events = EventAccumulator(str(logs), size_guidance={"histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"weights/0.weight", "weights/0.bias", "weights/2.weight"} <= set(tags["histograms"])
    hist = events.Histograms("weights/0.weight")[0].histogram_value
    assert hist.num == 16 * 8
    nan_hist = events.Histograms("weights/2.weight")[0].histogram_value
    assert nan_hist.num == 2 * 16 - 1  # the NaN is left out of its histogram, not the whole tensor
    assert any("gradscope/report" in t for t in tags["tensors"])


def test_progress_reaches_the_total_and_the_bar_stays_off_stdout(tmp_path, monkeypatch):
    from gradscope_cli import inspect_cmd

    state = {f"blocks.{i}.weight": torch.randn(32, 32) for i in range(5)}
    torch.save(state, tmp_path / "m.pt")
    seen: list[tuple[int, int]] = []
    gradscope.inspect_checkpoint(tmp_path / "m.pt", progress=lambda done, total: seen.append((done, total)))
    total = 5 * 32 * 32 * 4
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    monkeypatch.setattr(inspect_cmd, "PROGRESS_MIN_BYTES", 0)  # every checkpoint gets the bar
    result = run(str(tmp_path / "m.pt"), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["layers"]  # stdout is still nothing but the JSON


def test_probe_input_options_need_a_probe(tmp_path):
    torch.save({"w": torch.randn(3)}, tmp_path / "m.pt")
    assert_one_line_error(run(str(tmp_path / "m.pt"), "--input-dtype", "long"), "need --model")


def test_reading_on_one_thread_restores_the_thread_count(tmp_path):
    torch.save({"fc.weight": torch.randn(64, 64)}, tmp_path / "m.pt")
    before = torch.get_num_threads()
    seen: list[int] = []
    gradscope.inspect_checkpoint(tmp_path / "m.pt", progress=lambda done, total: seen.append(torch.get_num_threads()))
    assert set(seen) == {1}
    assert torch.get_num_threads() == before
