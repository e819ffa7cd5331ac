"""GradscopeCallback in real (tiny, CPU) Lightning fits: steps, losses, files, cleanup, a caught fault."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import zoo  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gradscope  # noqa: E402
from gradscope.errors import UsageError  # noqa: E402
from gradscope.integrations.lightning import GradscopeCallback  # noqa: E402

pytestmark = [
    # Lightning suggests more DataLoader workers for any in-memory loader; irrelevant to a tiny CPU test.
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
    # Lightning 2.6 builds torch's LeafSpec, which torch 2.13 deprecates: third-party noise, not ours to fix.
    pytest.mark.filterwarnings("ignore:.isinstance\\(treespec, LeafSpec\\). is deprecated:FutureWarning"),
]


class Classifier(pl.LightningModule):
    """zoo.relu_mlp under Lightning; remembers the raw loss of each batch and the grad norms it stepped with."""

    def __init__(self, dead: bool = False, manual: bool = False, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = zoo.relu_mlp(width=64)
        if dead:
            with torch.no_grad():
                self.net.fc2.bias.fill_(-10.0)  # every unit of net.act2 is off, for good
        self.automatic_optimization = not manual
        self.fail_at = fail_at
        self.batch_losses: list[float] = []
        self.stepped_grad_norms: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.batch_losses.append(loss.item())
        if self.automatic_optimization:
            return {"loss": loss}
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        self.stepped_grad_norms.append(self.net.fc1.weight.grad.norm().item())
        opt.step()
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.automatic_optimization:
            self.stepped_grad_norms.append(self.net.fc1.weight.grad.norm().item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def loader(batches: int = 8, batch: int = 32) -> DataLoader:
    data = zoo.classification(n=batches * batch, batch=batch)
    return DataLoader(TensorDataset(data.x, data.y), batch_size=batch, shuffle=False)


def fit(module: pl.LightningModule, tmp_path: Path, callbacks: list[Any], **trainer_kw: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=8, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, logger=TensorBoardLogger(tmp_path, name="run"),
    )
    options.update(trainer_kw)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(module, loader())
    return trainer


def assert_no_hooks(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for name, m in module.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert not m._backward_hooks and not m._backward_pre_hooks, name
    assert not optimizer._optimizer_step_pre_hooks
    assert not optimizer._optimizer_step_post_hooks


def test_fit_counts_steps_records_losses_writes_logs_and_unhooks(tmp_path: Path) -> None:
    module = Classifier()
    cb = GradscopeCallback(every=1)
    trainer = fit(module, tmp_path, [cb])

    scope = cb.scope
    assert scope is not None and scope.closed
    assert trainer.global_step == 8
    assert scope.history.steps_seen == 8
    assert [r.step for r in scope.history.records] == list(range(8))
    # One loss per optimizer step, the value training_step computed for it.
    assert [s for s, _ in scope.history.losses] == list(range(8))
    assert [v for _, v in scope.history.losses] == pytest.approx(module.batch_losses, rel=1e-6)
    # Gradients are read after Lightning's closure ran backward: the norms the optimizer stepped with.
    recorded = [r.params["net.fc1.weight"].grad_norm for r in scope.history.records]
    assert recorded == pytest.approx(module.stepped_grad_norms, rel=1e-5)

    assert isinstance(cb.report, gradscope.Report)
    assert cb.report.steps == 8
    assert cb.report.ok, [(f.kind, f.layer, f.severity) for f in cb.report.findings]
    assert not [f for f in cb.report.findings if f.kind == "dead_relu"]
    assert_no_hooks(module, trainer.optimizers[0])

    out = Path(trainer.logger.log_dir) / "gradscope"
    assert json.loads((out / "gradscope.json").read_text())["steps"] == 8
    assert list(out.glob("events.out.tfevents.*"))


def test_dead_relu_layer_is_caught(tmp_path: Path) -> None:
    cb = GradscopeCallback(every=1)
    fit(Classifier(dead=True), tmp_path, [cb])
    assert cb.report is not None
    found = {(f.kind, f.layer) for f in cb.report.findings}
    assert ("dead_relu", "net.act2") in found
    assert ("dead_relu", "net.act1") not in found


def test_gradient_accumulation_counts_optimizer_steps_and_averages_losses(tmp_path: Path) -> None:
    module = Classifier()
    cb = GradscopeCallback(every=1)
    trainer = fit(module, tmp_path, [cb], max_steps=4, accumulate_grad_batches=2)

    assert trainer.global_step == 4
    assert cb.scope is not None and cb.scope.history.steps_seen == 4
    raw = module.batch_losses
    assert len(raw) == 8
    expected = [(raw[2 * i] + raw[2 * i + 1]) / 2 for i in range(4)]
    assert [s for s, _ in cb.scope.history.losses] == [0, 1, 2, 3]
    assert [v for _, v in cb.scope.history.losses] == pytest.approx(expected, rel=1e-6)
    # The recorded gradient is the accumulated one the optimizer applied.
    recorded = [r.params["net.fc1.weight"].grad_norm for r in cb.scope.history.records]
    assert recorded == pytest.approx(module.stepped_grad_norms, rel=1e-5)
    assert_no_hooks(module, trainer.optimizers[0])


def test_manual_optimization(tmp_path: Path) -> None:
    module = Classifier(manual=True)
    cb = GradscopeCallback(every=2)
    trainer = fit(module, tmp_path, [cb], max_steps=6)

    assert trainer.global_step == 6
    assert cb.scope is not None and cb.scope.history.steps_seen == 6
    assert [r.step for r in cb.scope.history.records] == [0, 2, 4]
    assert [v for _, v in cb.scope.history.losses] == pytest.approx(module.batch_losses, rel=1e-6)
    recorded = [r.params["net.fc1.weight"].grad_norm for r in cb.scope.history.records]
    assert recorded == pytest.approx(module.stepped_grad_norms[::2], rel=1e-5)
    assert cb.report is not None and cb.report.steps == 6
    assert_no_hooks(module, trainer.optimizers[0])


def test_failed_fit_leaves_no_hooks(tmp_path: Path) -> None:
    module = Classifier(fail_at=3)
    cb = GradscopeCallback(every=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=8, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=False, callbacks=[cb],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, loader())
    assert cb.scope is not None and cb.scope.closed
    assert cb.report is not None and cb.report.steps == 3
    assert_no_hooks(module, trainer.optimizers[0])


def test_training_numbers_are_unchanged(tmp_path: Path) -> None:
    """The closure is evaluated before step() instead of inside it: the same seed gives the same weights."""

    def run(callbacks: list[Any]) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        module = Classifier()
        fit(module, tmp_path, callbacks, logger=False)
        return module.batch_losses, module.state_dict()

    plain_losses, plain = run([])
    watched_losses, watched = run([GradscopeCallback(every=1)])
    assert watched_losses == plain_losses
    assert plain.keys() == watched.keys()
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_explicit_log_dir_and_no_logger(tmp_path: Path) -> None:
    cb = GradscopeCallback(every=4, log_dir=tmp_path / "gs")
    fit(Classifier(), tmp_path, [cb], logger=False)
    assert json.loads((tmp_path / "gs" / "gradscope.json").read_text())["steps"] == 8

    quiet = GradscopeCallback(every=4)
    fit(Classifier(), tmp_path / "quiet", [quiet], logger=False)
    assert quiet.report is not None and quiet.report.steps == 8
    assert not (tmp_path / "quiet").exists()


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(UsageError, match="every"):
        GradscopeCallback(every=0)
    with pytest.raises(UsageError, match="thresholds"):
        GradscopeCallback(thresholds={"dead_warning": 0.3})  # type: ignore[arg-type]


def test_gradscope_import_stays_light() -> None:
    code = "import sys, gradscope; print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_lightning_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.loggers", "pytorch_lightning",
                 "pytorch_lightning.loggers"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes import raise ImportError
    monkeypatch.delitem(sys.modules, "gradscope.integrations.lightning")
    with pytest.raises(ImportError, match="pip install lightning"):
        import gradscope.integrations.lightning  # noqa: F401
