"""PyTorch Lightning integration: ``Trainer(callbacks=[GradscopeCallback()])`` watches the whole fit.

Importing this module imports Lightning; ``import gradscope`` never does.

    from gradscope.integrations.lightning import GradscopeCallback

    cb = GradscopeCallback(every=10)
    trainer = L.Trainer(max_epochs=3, callbacks=[cb])
    trainer.fit(module, datamodule)
    print(cb.report.findings)

What happens when (see docs/integrations.md):

- ``on_fit_start``: the LightningModule is watched with the Trainer's torch optimizers, so every optimizer
  step ends one gradscope step (the Trainer needs no other line). The precision plugin's GradScaler (fp16
  mixed precision), when there is one, is handed to :func:`gradscope.watch` as ``scaler=``.
- ``on_train_batch_end``: the batch's loss (``training_step``'s output) joins the step it belongs to; with
  ``accumulate_grad_batches=k`` the k micro-batch losses of one optimizer step are averaged.
- ``on_fit_end`` / ``on_exception`` / ``teardown``: the scope is closed (hooks removed, files flushed) and
  the final report is kept in ``.report``.
- Files go to ``<logger.log_dir>/gradscope`` of the Trainer's first TensorBoard logger (a run of its own, so
  gradscope's ``loss`` tag never mixes with a ``self.log("loss")`` of the module), or to ``log_dir=``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # the older package name ships the same API
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.loggers import TensorBoardLogger  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "gradscope.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from exc

from ..config import DEFAULT_EVERY, Thresholds, validate_options
from ..errors import UsageError
from ..findings import Report
from ..scope import Scope, watch

__all__ = ["GradscopeCallback"]

#: Sub-folder of the TensorBoard logger's run folder that gradscope writes into.
LOGGER_SUBDIR = "gradscope"


class GradscopeCallback(pl.Callback):
    """Watches the LightningModule's gradient flow for the length of ``trainer.fit``.

    Args:
        every: collect statistics on every N-th optimizer step; None: the default schedule (as in
            :func:`gradscope.watch`).
        thresholds: analyzer thresholds, a :class:`gradscope.Thresholds`.
        log_dir: where gradscope writes TensorBoard events and ``gradscope.json``. ``None`` (default): the
            ``gradscope`` sub-folder of the Trainer's first TensorBoard logger, or no files without one.
        console: print the terminal report when fit ends.
        **watch_options: further options of :func:`gradscope.watch` (``histograms``, ``history``).

    After fit, ``.report`` holds the final :class:`gradscope.Report` and ``.scope`` the (closed) scope, whose
    ``history`` keeps the collected statistics.
    """

    def __init__(
        self,
        every: int | None = DEFAULT_EVERY,
        thresholds: Thresholds | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        console: Any = False,
        **watch_options: Any,
    ) -> None:
        # Validate here, not at fit start: a typo should fail before a long job sets itself up.
        validate_options(every, thresholds, log_dir)  # the same checks and messages as watch()
        self.every = every
        self.thresholds = thresholds
        self.log_dir = log_dir
        self.console = console
        self.watch_options = watch_options
        self.scope: Scope | None = None
        self.report: Report | None = None
        self._pending: list[torch.Tensor] = []  # losses of the micro-batches of the step in progress
        self._steps_seen = 0
        self._loss_scale = 1

    # --- fit lifetime -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()  # a previous fit with this callback that never reached its end
        # Lightning steps with optimizer.step(closure): gradscope reads the gradients right after the
        # closure's first call, so the statistics are those of this step's backward.
        optimizers = [_torch_optimizer(o) for o in trainer.optimizers]
        options = dict(self.watch_options)
        scaler = framework_scaler(trainer)
        if scaler is not None and options.get("scaler") is None:
            options["scaler"] = scaler  # fp16: steps the scaler skips are skipped steps, not NaNs
        self.scope = watch(
            pl_module,
            optimizers or None,
            log_dir=self._resolve_log_dir(trainer),
            every=self.every,
            console=self.console,
            thresholds=self.thresholds,
            **options,
        )
        self.report = None
        self._pending = []
        self._steps_seen = self.scope.history.steps_seen
        # Automatic optimization hands on_train_batch_end the loss divided by accumulate_grad_batches.
        self._loss_scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        scope = self.scope
        if scope is None or scope.closed:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            self._pending.append(loss.detach().float().reshape(()) * self._loss_scale)
        if scope.history.steps_seen > self._steps_seen:
            # An optimizer step ended during this batch: its loss is the mean over its micro-batches,
            # kept on the device (no host sync here; gradscope moves losses to the host in bulk).
            self._steps_seen = scope.history.steps_seen
            if self._pending:
                scope.step(loss=torch.stack(self._pending).mean())
            self._pending = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish()  # the model must be left without hooks even when fit fails

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish()  # safety net: idempotent after on_fit_end / on_exception

    # --- helpers ------------------------------------------------------------------------------------------
    def _resolve_log_dir(self, trainer: pl.Trainer) -> str | os.PathLike[str] | None:
        if self.log_dir is not None:
            return self.log_dir
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and logger.log_dir:
                return Path(logger.log_dir) / LOGGER_SUBDIR
        return None

    def _finish(self) -> None:
        """Close the scope once and keep its final report; the model is left without any gradscope hook."""
        scope = self.scope
        if scope is None or scope.closed:
            return
        scope.close()
        self.report = scope.last_report  # close() made the final report


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Lightning's (or anyone's) wrapper: its step hooks are the ones that fire."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8:  # LightningOptimizer, AcceleratedOptimizer, ...
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(
            f"GradscopeCallback needs torch.optim.Optimizer instances, the Trainer has {type(optimizer).__name__}"
        )
    return optimizer


def framework_scaler(trainer: Any) -> Any:
    """The GradScaler of the Trainer's precision plugin ("16-mixed" on a GPU, or one passed to
    ``MixedPrecision(scaler=...)``); None without one."""
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None:
        plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not all(hasattr(scaler, a) for a in ("update", "get_scale", "step")):
        return None
    return scaler if getattr(scaler, "is_enabled", lambda: True)() else None


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss in ``training_step``'s output: a scalar tensor, or the "loss" entry of a mapping."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs
    return None
