"""The Lightning and Hugging Face callbacks hand the framework's GradScaler to watch(scaler=...), so the
steps it skips while calibrating are counted as skipped steps, not taken for NaNs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from gradscope.integrations.lightning import GradscopeCallback, framework_scaler  # noqa: E402

pytestmark = [
    # Lightning's third-party noise, as in test_integrations_lightning.py.
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:.isinstance\\(treespec, LeafSpec\\). is deprecated:FutureWarning"),
]

INIT_SCALE = 2.0**24  # large on purpose: fp16 gradients overflow at first and the scaler skips steps


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_lightning_hands_its_grad_scaler_to_watch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=32)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    cb = GradscopeCallback(every=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=8, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=False, callbacks=[cb],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert framework_scaler(trainer) is scaler
    trainer.fit(Classifier(), data)
    assert cb.scope is not None and cb.scope.scaler is scaler
    # Ground truth from the scaler itself: each skipped step halved its scale (no growth within 8 steps).
    skipped = round(math.log2(INIT_SCALE / scaler.get_scale()))
    assert skipped > 0
    assert cb.scope.history.skipped_total == skipped
    assert not [f for f in cb.report.findings if f.kind == "nonfinite" and f.severity != "info"]


def test_no_scaler_without_mixed_precision() -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert framework_scaler(trainer) is None
