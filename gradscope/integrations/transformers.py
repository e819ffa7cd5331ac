"""Hugging Face integration: ``Trainer(..., callbacks=[GradscopeCallback()])`` watches ``trainer.train()``.

Importing this module imports ``transformers``; ``import gradscope`` never does.

    from gradscope.integrations.transformers import GradscopeCallback

    cb = GradscopeCallback(every=10)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    print(cb.report.findings)

What happens when (see docs/integrations.md):

- ``on_train_begin``: the model is watched with the torch optimizer under accelerate's
  ``AcceleratedOptimizer``, so every real optimizer step ends one gradscope step (accumulation micro-batches
  and steps accelerate skips are not steps).
- ``on_log``: ``logs["loss"]`` joins the step that just ended. It is the Trainer's own number: the mean
  training loss since the previous log, already on the host, so gradscope adds no device sync. With
  ``logging_steps=1`` every step has its loss; with ``logging_steps=n`` the loss curve has one point per n
  steps.
- ``on_train_end``: the scope is closed and the final report kept in ``.report``. The Trainer has no
  exception event: after a failed ``train()`` call :meth:`GradscopeCallback.close` (the next
  ``train()`` also closes a scope left open).
- Files go to ``log_dir=``, or to ``<output_dir>/gradscope`` when the Trainer reports to TensorBoard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:
    raise ImportError(
        "gradscope.integrations.transformers needs Hugging Face transformers: pip install transformers accelerate"
    ) from exc

from ..config import DEFAULT_EVERY, Thresholds, validate_options
from ..errors import UsageError
from ..findings import Report
from ..scope import Scope, watch

__all__ = ["GradscopeCallback"]

#: Sub-folder of ``TrainingArguments.output_dir`` that gradscope writes into when reporting to TensorBoard.
OUTPUT_SUBDIR = "gradscope"


class GradscopeCallback(TrainerCallback):
    """Watches the model's gradient flow for the length of ``Trainer.train()``.

    Args:
        every: collect statistics on every N-th optimizer step; None: the default schedule (as in
            :func:`gradscope.watch`).
        thresholds: analyzer thresholds, a :class:`gradscope.Thresholds`.
        log_dir: where gradscope writes TensorBoard events and ``gradscope.json``. ``None`` (default):
            ``<output_dir>/gradscope`` when ``"tensorboard"`` is in ``args.report_to``, else no files.
        console: print the terminal report when training ends (on the main process only).
        **watch_options: further options of :func:`gradscope.watch` (``histograms``, ``history``).

    After training, ``.report`` holds the final :class:`gradscope.Report` and ``.scope`` the (closed) scope,
    whose ``history`` keeps the collected statistics.
    """

    def __init__(
        self,
        every: int | None = DEFAULT_EVERY,
        thresholds: Thresholds | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        console: Any = False,
        **watch_options: Any,
    ) -> None:
        # Validate here, not at train start: a typo should fail before a long job sets itself up.
        validate_options(every, thresholds, log_dir)  # the same checks and messages as watch()
        self.every = every
        self.thresholds = thresholds
        self.log_dir = log_dir
        self.console = console
        self.watch_options = watch_options
        self.scope: Scope | None = None
        self.report: Report | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()  # a previous train() that failed before its end
        model = kwargs.get("model")
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"GradscopeCallback needs the Trainer's torch model, got {type(model).__name__}")
        optimizer = kwargs.get("optimizer")
        self.report = None
        self.scope = watch(
            model,
            _torch_optimizer(optimizer) if optimizer is not None else None,
            log_dir=self._resolve_log_dir(args),
            every=self.every,
            console=self.console if state.is_world_process_zero else False,
            thresholds=self.thresholds,
            **self.watch_options,
        )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        scope = self.scope
        # Evaluation logs carry "eval_loss" and the end-of-training summary "train_loss": neither is a step's.
        if scope is None or scope.closed or not logs or "loss" not in logs:
            return
        if scope.history.steps_seen == 0:
            return  # no optimizer step has ended yet: nothing to attach the loss to
        scope.step(loss=float(logs["loss"]))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the scope (hooks removed, files flushed) and keep its final report. Idempotent."""
        scope = self.scope
        if scope is None or scope.closed:
            return
        scope.close()
        self.report = scope.last_report  # close() made the final report

    def _resolve_log_dir(self, args: TrainingArguments) -> str | os.PathLike[str] | None:
        if self.log_dir is not None:
            return self.log_dir
        if "tensorboard" in (args.report_to or []):
            return Path(args.output_dir) / OUTPUT_SUBDIR
        return None


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer``: its step hooks are the ones that fire."""
    seen = 0
    # AcceleratedOptimizer subclasses torch's Optimizer without being one in practice: unwrap while it wraps.
    while hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(
            f"GradscopeCallback needs a torch.optim.Optimizer under the Trainer's optimizer, got {type(optimizer).__name__}"
        )
    return optimizer
