"""gradscope.json: exactly the contract's Report.to_dict(), the run summary beside it, replaced atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gradscope.findings import Finding, Report
from gradscope.reporters import json as json_reporter
from gradscope.reporters._safe import ReportingWarning
from gradscope.reporters._values import as_float
from gradscope.reporters.json import JSON_NAME, SUMMARY_NAME, read_document, read_summary, write_json

FINDING = Finding("exploding_gradient", "critical", "fc2", 7, "Gradient at fc2 grew 1e4x.", "Clip gradients.",
                  {"growth": 1e4})


def _report() -> Report:
    return Report(findings=[FINDING], steps=40, layers={"fc2": {"type": "Linear", "grad_norm": 3.5}})


def test_writes_report_dict_and_summary(tmp_path: Path) -> None:
    path = tmp_path / JSON_NAME
    summary = {"loss_first": 2.0, "loss_last": float("nan"), "lrs": [1e-3, float("inf")]}
    assert write_json(_report(), path, summary=summary)
    text = path.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert data == _report().to_dict()  # the report file is exactly the contract's dict
    side = json.loads((tmp_path / SUMMARY_NAME).read_text(), parse_constant=lambda c: pytest.fail(c))
    assert side == {"loss_first": 2.0, "loss_last": "nan", "lrs": [1e-3, "inf"]}
    assert read_summary(path) == side
    assert as_float(side["loss_last"]) != as_float(side["loss_last"])  # NaN back
    assert Report.from_dict(read_document(path)).findings == [FINDING]
    assert set(os.listdir(tmp_path)) == {JSON_NAME, SUMMARY_NAME}  # no temporary file left behind


def test_replaces_atomically_and_keeps_the_old_file_when_the_swap_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / JSON_NAME
    write_json(Report(steps=1), path)
    write_json(_report(), path)  # a second report replaces the first in place
    assert json.loads(path.read_text())["steps"] == 40

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json_reporter.os, "replace", broken_replace)
    other = tmp_path / "sub" / JSON_NAME
    with pytest.warns(ReportingWarning, match="No space left on device") as caught:
        assert write_json(Report(steps=99), other) is False
        assert write_json(Report(steps=100), other) is False  # the same target warns only once
    assert len(caught) == 1
    assert os.listdir(tmp_path / "sub") == []  # the temporary file was cleaned up
    assert json.loads(path.read_text())["steps"] == 40  # other files untouched


def test_unwritable_path_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(ReportingWarning, match="stopped writing the report"):
        assert write_json(_report(), blocker / "run" / JSON_NAME) is False
