"""The Hugging Face callback judges every step's loss, whatever ``logging_steps`` is, and a NaN loss
arrives as NaN (the Trainer's own logs filter it). The reference losses are the Trainer's own logs of an
identical, seeded run with ``logging_steps=1``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate.optimizer import AcceleratedOptimizer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from gradscope.integrations.transformers import GradscopeCallback, framework_scaler

SEQ = 12


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 96, lm: bool = False) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 64, (n, SEQ), generator=g)
        self.lm = lm
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i] if self.lm else self.labels[i]
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels}


class Logged(TrainerCallback):
    """The losses the Trainer logged, at the step each belongs to."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append((state.global_step - 1, float(logs["loss"])))


def bert() -> nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, num_labels=2))


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2))


def train(model: nn.Module, tmp_path: Path, callbacks: list[Any], dataset: Any, **kw: Any) -> Trainer:
    options: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    options.update(kw)
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.fixture
def one_thread() -> Any:
    """Identical runs on a busy machine: one thread, one reduction order (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("build", "lm", "accumulation"), [(bert, False, 1), (gpt2, True, 2)])
def test_every_step_has_its_loss_with_logging_steps_500(tmp_path: Path, build: Any, lm: bool, accumulation: int) -> None:
    reference = Logged()
    train(build(), tmp_path / "ref", [reference], Tokens(lm=lm), logging_steps=1,
          gradient_accumulation_steps=accumulation)
    assert [s for s, _ in reference.losses] == list(range(6))

    logged, cb = Logged(), GradscopeCallback()  # the default schedule, as a user would leave it
    train(build(), tmp_path / "run", [logged, cb], Tokens(lm=lm), logging_steps=500,
          gradient_accumulation_steps=accumulation)
    assert logged.losses == []  # the Trainer itself logged no loss at all
    assert cb.scope is not None and cb.scope.history.steps_seen == 6
    got = list(cb.scope.history.losses)
    assert [s for s, _ in got] == list(range(6))
    # GPT-2 normalizes each micro-batch's loss by the window's token count: the step's loss is their sum.
    assert [v for _, v in got] == pytest.approx([v for _, v in reference.losses], rel=1e-4)
    assert all(not m._forward_hooks for m in cb.scope.model.modules())  # the loss hook is gone too


class Regressor(nn.Module):
    """A linear regression returning {"loss": ...} as a Hugging Face model does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.fc(x)
        return {"loss": nn.functional.mse_loss(out.squeeze(-1), labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    """Rows of noise; the batch of step ``bad`` (batch 8, no shuffling) holds a NaN: that step's loss is NaN."""

    def __init__(self, bad: int) -> None:
        g = torch.Generator().manual_seed(2)
        self.x = torch.randn(64, 4, generator=g)
        self.x[bad * 8, 0] = float("nan")  # a corrupt sample
        self.y = torch.randn(64, generator=g)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def test_a_nan_loss_arrives_as_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Trainer, "_get_train_sampler", lambda self, *a, **k: torch.utils.data.SequentialSampler(self.train_dataset))
    # Ground truth, in plain torch: batch 3 gives a NaN loss whatever the weights (a NaN in its input).
    data, model = Rows(bad=3), Regressor()
    assert math.isnan(float(model(data.x[24:32], data.y[24:32])["loss"].detach()))

    reference = Logged()
    train(Regressor(), tmp_path / "ref", [reference], Rows(bad=3), logging_steps=1, max_steps=5, max_grad_norm=0.0)
    assert [s for s, _ in reference.losses] == list(range(5))
    assert all(math.isfinite(v) for _, v in reference.losses)  # the Trainer's NaN filter hides it in its logs

    cb = GradscopeCallback()
    train(Regressor(), tmp_path / "run", [cb], Rows(bad=3), logging_steps=500, max_steps=5, max_grad_norm=0.0)
    assert cb.scope is not None
    losses = dict(cb.scope.history.losses)
    assert [losses[s] for s in range(3)] == pytest.approx([v for _, v in reference.losses[:3]], rel=1e-4)
    assert math.isnan(losses[3])
    assert cb.scope.history.first_nonfinite is not None and cb.scope.history.first_nonfinite.step == 3


def test_accelerates_grad_scaler_is_handed_to_watch(tmp_path: Path) -> None:
    model = bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    wrapped = AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)
    assert framework_scaler(wrapped) is scaler
    assert framework_scaler(AcceleratedOptimizer(opt, device_placement=False)) is None
    assert framework_scaler(opt) is None

    cb = GradscopeCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=wrapped)
    try:
        assert cb.scope is not None and cb.scope.scaler is scaler
    finally:
        cb.close()
    assert all(not m._forward_hooks for m in model.modules())
