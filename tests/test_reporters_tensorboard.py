"""TensorBoard events written during real watched runs, read back with TensorBoard's own reader."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

import gradscope
from gradscope.findings import Finding, Report
from gradscope.reporters._safe import ReportingWarning
from gradscope.reporters.tensorboard import FINDINGS_TAG, TensorBoardWriter, findings_markdown
from gradscope.stats.history import History
from gradscope.stats.records import ActivationStats, GradStats, LayerInfo, StepRecord

TEXT_TAG = FINDINGS_TAG + "/text_summary"


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _train(model: nn.Module, opt: torch.optim.Optimizer, scope: gradscope.Scope, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 6)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        scope.step(loss=loss)
        losses.append(loss.item())
    return losses


def _read(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def _layout(acc: EventAccumulator) -> layout_pb2.Layout:
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return layout


def test_watched_run_writes_per_layer_scalars_loss_and_lr(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with gradscope.watch(model, opt, log_dir=tmp_path, every=2) as scope:
        losses = []
        for _ in range(4):
            losses += _train(model, opt, scope, 5)
            sched.step()
        history = scope.history
        records = list(history.records)
    acc = _read(tmp_path)
    tags = set(acc.Tags()["scalars"])
    for layer in ("0", "2", "4"):
        assert {f"grad_norm/{layer}", f"act_rms/{layer}", f"update_ratio/{layer}"} <= tags
    assert "dead_frac/1" in tags and "dead_frac/3" not in tags  # dead units only mean something for ReLU
    assert "saturated_frac/3" in tags
    assert {"loss", "lr/group0"} <= tags

    # one point per collected step, holding exactly the number the history recorded
    points = acc.Scalars("grad_norm/2")
    assert [p.step for p in points] == [r.step for r in records] == list(range(0, 20, 2))
    assert [p.value for p in points] == pytest.approx([r.gradients["2"].norm for r in records], rel=1e-6)
    # the loss of every step, collected or not; the learning rate follows the schedule
    assert [p.value for p in acc.Scalars("loss")] == pytest.approx(losses, rel=1e-6)
    lrs = {p.step: p.value for p in acc.Scalars("lr/group0")}
    assert lrs[0] == pytest.approx(0.05, rel=1e-6) and lrs[18] == pytest.approx(0.05 * 0.5**3, rel=1e-6)
    # ReLU dead share: 1 - mean(alive) of that step's mask
    assert acc.Scalars("dead_frac/1")[0].value == pytest.approx(1.0 - float(np.mean(records[0].activations["1"].alive)))
    # the layer's update ratio: ||dW,db|| / ||W,b|| over its own parameters
    p_w, p_b = records[-1].params["2.weight"], records[-1].params["2.bias"]
    expected = ((p_w.update_norm**2 + p_b.update_norm**2) / (p_w.weight_norm**2 + p_b.weight_norm**2)) ** 0.5
    assert acc.Scalars("update_ratio/2")[-1].value == pytest.approx(expected, rel=1e-5)
    assert acc.Tags()["histograms"] == []  # never histograms unless asked

    # Custom Scalars: one multi-line chart per statistic, matching every layer's tag
    layout = _layout(acc)
    stats = next(c for c in layout.category if c.title.startswith("gradscope: statistics"))
    charts = {c.title: list(c.multiline.tag) for c in stats.chart}
    assert {"grad_norm", "act_rms", "dead_frac", "update_ratio", "loss", "lr"} <= set(charts)
    assert sorted(t for t in tags if re.match(charts["grad_norm"][0], t)) == [f"grad_norm/{i}" for i in range(5)]
    # close() made a final report: the findings text is there
    assert acc.Tensors(TEXT_TAG)


def _record(step: int, sample: bool = False) -> StepRecord:
    act = ActivationStats(numel=8, mean=0.0, std=1.0, rms=1.0, absmax=2.0, zero_frac=0.5, neg_frac=0.0, nan=0, inf=0,
                          alive=np.array([True, False]), sample=np.array([0.0, 1.0, np.nan]) if sample else None)
    grad = GradStats(norm=0.5, absmax=0.1, nan=0, inf=0, order=0,
                     sample=np.array([0.1, -0.2, 0.3]) if sample else None)
    return StepRecord(step=step, activations={"relu": act}, gradients={"relu": grad}, loss=1.0 / (step + 1))


def _history() -> History:
    return History(layers={"relu": LayerInfo(name="relu", type="ReLU", role="relu", order=0)})


def test_findings_text_rewritten_only_when_they_change_and_layout_per_kind(tmp_path: Path) -> None:
    history = _history()
    with TensorBoardWriter(tmp_path) as writer:
        for step in range(3):
            record = _record(step)
            history.add(record)
            writer.write_record(history, record)
        healthy = Report(steps=3)
        writer.write_report(healthy)
        writer.write_report(healthy)  # same findings: nothing new written
        dead = Finding("dead_relu", "critical", "relu", 1, "Half of relu's | units never fire.", "Lower the lr.")
        writer.write_report(Report(findings=[dead], steps=3))
    acc = _read(tmp_path)
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(TEXT_TAG)]
    assert len(texts) == 2
    assert texts[0] == "No findings after 3 steps: gradient flow looks healthy."
    assert "| **critical** | dead_relu | `relu` | 1 | Half of relu's \\| units never fire. |" in texts[1]
    assert texts[1].endswith("**How to fix**\n\n- Lower the lr. (dead_relu at `relu`)")
    layout = _layout(acc)
    findings = next(c for c in layout.category if c.title == "gradscope: findings")
    chart = next(c for c in findings.chart if c.title == "dead relu")
    assert list(chart.multiline.tag) == [r"^dead_frac/relu$"]
    assert [t for t in acc.Tags()["scalars"] if re.match(chart.multiline.tag[0], t)] == ["dead_frac/relu"]
    assert [p.value for p in acc.Scalars("loss")] == pytest.approx([1.0, 0.5, 1.0 / 3])


def test_findings_markdown_says_each_fix_once() -> None:
    same = [Finding("vanishing_gradient", "warning", f"fc{i}", 0, "m", "Use ReLU.") for i in range(2)]
    markdown = findings_markdown(Report(findings=[*same, Finding("loss_divergence", "critical", "", 5, "up", "")]))
    assert markdown.count("Use ReLU.") == 1
    assert "- Use ReLU. (vanishing_gradient at `fc0`, vanishing_gradient at `fc1`)" in markdown
    assert "| **critical** | loss_divergence | (model) | 5 | up |" in markdown


def test_histograms_only_when_asked(tmp_path: Path) -> None:
    history = _history()
    record = _record(0, sample=True)
    history.add(record)
    with TensorBoardWriter(tmp_path / "on", histograms=True) as writer:
        writer.write_record(history, record)
    with TensorBoardWriter(tmp_path / "off") as writer:
        writer.write_record(history, record)
    on = _read(tmp_path / "on")
    assert sorted(on.Tags()["histograms"]) == ["activations/relu", "gradients/relu"]
    assert on.Histograms("activations/relu")[0].histogram_value.num == 2  # the NaN has no bucket
    assert _read(tmp_path / "off").Tags()["histograms"] == []


def test_removed_log_dir_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, opt, log_dir=log_dir, every=1) as scope:
            _train(model, opt, scope, 3)
            shutil.rmtree(log_dir)
            losses = _train(model, opt, scope, 5)
        steps = scope.history.steps_seen
    assert steps == 8 and len(losses) == 5  # every step ran and was counted
    tb = [w for w in caught if issubclass(w.category, ReportingWarning) and "TensorBoard" in str(w.message)]
    assert len(tb) == 1
    assert "stopped writing" in str(tb[0].message)


def test_unwritable_log_dir_warns_once_and_writes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    history = _history()
    with pytest.warns(ReportingWarning, match="stopped writing TensorBoard logs") as caught:
        writer = TensorBoardWriter(blocker / "run")
        for step in range(3):
            record = _record(step)
            history.add(record)
            writer.write_record(history, record)
        writer.write_report(Report(steps=3))
        writer.close()
    assert len(caught) == 1 and writer.failed
