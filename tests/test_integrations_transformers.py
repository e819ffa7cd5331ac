"""GradscopeCallback in real (tiny, CPU) Hugging Face Trainer runs: steps, losses, files, cleanup, a caught fault."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradscope
from gradscope.errors import UsageError
from gradscope.integrations.transformers import GradscopeCallback

SEQ = 12


def tiny_bert(dead: bool = False) -> BertForSequenceClassification:
    """A one-layer BERT built from a config (nothing downloaded), with a ReLU in its MLP."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, hidden_act="relu", num_labels=2,
    )
    model = BertForSequenceClassification(config)
    if dead:
        with torch.no_grad():
            model.bert.encoder.layer[0].intermediate.dense.bias.fill_(-10.0)  # every unit of the ReLU is off
    return model


class Tokens(torch.utils.data.Dataset):
    """Random token sequences labelled by whether token 7 occurs: learnable, seeded, in memory."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 64, (n, SEQ), generator=g)
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


class Recorder(TrainerCallback):
    """What the Trainer itself saw: logged losses and the gradient norm each optimizer step applied."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []
        self.grad_norms: list[float] = []
        self.logged_grad_norms: list[float] = []  # the Trainer's global norm, before its clipping

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module, **kwargs: Any) -> None:
        self.grad_norms.append(model.classifier.weight.grad.norm().item())

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append((state.global_step - 1, logs["loss"]))
        if logs and "grad_norm" in logs:
            self.logged_grad_norms.append(float(logs["grad_norm"]))


def train(model: nn.Module, tmp_path: Path, callbacks: list[Any], **args_kw: Any) -> Trainer:
    options: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    options.update(args_kw)
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=Tokens(), callbacks=callbacks)
    trainer.train()
    return trainer


def assert_no_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert not m._backward_hooks and not m._backward_pre_hooks, name
    assert not optimizer._optimizer_step_pre_hooks
    assert not optimizer._optimizer_step_post_hooks


def test_train_counts_steps_records_losses_and_unhooks(tmp_path: Path) -> None:
    model, rec, cb = tiny_bert(), Recorder(), GradscopeCallback(every=1)
    trainer = train(model, tmp_path, [rec, cb])

    scope = cb.scope
    assert scope is not None and scope.closed
    assert trainer.state.global_step == 8
    assert scope.history.steps_seen == 8
    assert [r.step for r in scope.history.records] == list(range(8))
    # logging_steps=1: each step gets the loss the Trainer logged for it.
    assert [s for s, _ in scope.history.losses] == [s for s, _ in rec.losses] == list(range(8))
    assert [v for _, v in scope.history.losses] == pytest.approx([v for _, v in rec.losses], rel=1e-6)
    # grad_norm_clipped is what the optimizer applied (after the Trainer's clipping); grad_norm is what
    # backward produced, so the global pre-clip norm is the one the Trainer logs, and clip_ratio shows it.
    recorded = [r.params["classifier.weight"].grad_norm_clipped for r in scope.history.records]
    assert recorded == pytest.approx(rec.grad_norms, rel=1e-5)
    pre = [math.sqrt(sum(p.grad_norm**2 for p in r.params.values() if p.grad_norm)) for r in scope.history.records]
    assert pre == pytest.approx(rec.logged_grad_norms, rel=1e-3)
    ratios = [r.clip_ratio for r in scope.history.records]
    assert ratios == pytest.approx([max(g, 1.0) for g in rec.logged_grad_norms], rel=1e-3)

    assert isinstance(cb.report, gradscope.Report)
    assert cb.report.steps == 8
    assert cb.report.ok, [(f.kind, f.layer, f.severity) for f in cb.report.findings]
    assert not [f for f in cb.report.findings if f.kind == "dead_relu"]
    assert_no_hooks(model, trainer.optimizer.optimizer)
    assert not (tmp_path / "out" / "gradscope").exists()  # report_to="none": no files unless asked


def test_dead_relu_layer_is_caught(tmp_path: Path) -> None:
    cb = GradscopeCallback(every=1)
    train(tiny_bert(dead=True), tmp_path, [cb])
    assert cb.report is not None
    found = {(f.kind, f.layer) for f in cb.report.findings}
    assert ("dead_relu", "bert.encoder.layer.0.intermediate.intermediate_act_fn") in found


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    model, rec, cb = tiny_bert(), Recorder(), GradscopeCallback(every=2)
    trainer = train(model, tmp_path, [rec, cb], max_steps=3, gradient_accumulation_steps=2, logging_steps=2)

    assert trainer.state.global_step == 3
    assert cb.scope is not None and cb.scope.history.steps_seen == 3
    assert [r.step for r in cb.scope.history.records] == [0, 2]
    # Every optimizer step has its own loss (read from the model's outputs), whatever logging_steps is;
    # the Trainer's one log (logging_steps=2) is the mean of the first two.
    assert [s for s, _ in cb.scope.history.losses] == [0, 1, 2]
    assert [s for s, _ in rec.losses] == [1]
    first_two = [v for _, v in cb.scope.history.losses][:2]
    assert sum(first_two) / 2 == pytest.approx(rec.losses[0][1], rel=1e-5)
    # what the optimizer applied (after clipping); grad_norm, summed over both micro-batches, is no smaller
    recorded = [r.params["classifier.weight"].grad_norm_clipped for r in cb.scope.history.records]
    assert recorded == pytest.approx(rec.grad_norms[::2], rel=1e-5)
    pre = [r.params["classifier.weight"].grad_norm for r in cb.scope.history.records]
    assert all(p >= c * (1 - 1e-6) for p, c in zip(pre, recorded, strict=True))
    assert_no_hooks(model, trainer.optimizer.optimizer)


def test_tensorboard_reporting_writes_next_to_the_run(tmp_path: Path) -> None:
    cb = GradscopeCallback(every=4)
    train(tiny_bert(), tmp_path, [cb], report_to="tensorboard")
    out = tmp_path / "out" / "gradscope"
    assert json.loads((out / "gradscope.json").read_text())["steps"] == 8
    assert list(out.glob("events.out.tfevents.*"))

    explicit = GradscopeCallback(every=4, log_dir=tmp_path / "gs")
    train(tiny_bert(), tmp_path / "second", [explicit])
    assert json.loads((tmp_path / "gs" / "gradscope.json").read_text())["steps"] == 8


def test_failed_train_is_closed_by_close_or_next_train(tmp_path: Path) -> None:
    class Boom(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                raise RuntimeError("boom")

    model, cb = tiny_bert(), GradscopeCallback(every=1)
    with pytest.raises(RuntimeError, match="boom"):
        train(model, tmp_path, [cb, Boom()])
    assert cb.scope is not None and not cb.scope.closed  # the Trainer has no exception event
    cb.close()
    assert cb.scope.closed
    assert cb.report is not None and cb.report.steps == 3
    for m in model.modules():
        assert not m._forward_hooks


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(UsageError, match="every"):
        GradscopeCallback(every=1.5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="log_dir"):
        GradscopeCallback(log_dir=3)  # type: ignore[arg-type]


def test_missing_transformers_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # None in sys.modules makes import raise ImportError
    monkeypatch.delitem(sys.modules, "gradscope.integrations.transformers")
    with pytest.raises(ImportError, match="pip install transformers accelerate"):
        import gradscope.integrations.transformers  # noqa: F401
