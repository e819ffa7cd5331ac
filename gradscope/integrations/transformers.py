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
- Every optimizer step gets its own loss, read from the model's outputs: a forward hook on the model keeps
  the ``loss`` of each training forward as a detached 0-d tensor on the device (no host sync; gradscope moves
  losses to the host in bulk), and ``on_step_end`` hands the step's loss to the scope: the mean of its
  micro-batch losses, or their sum when the Trainer had the model normalize each by the tokens of the whole
  accumulation window (``num_items_in_batch``), which is what the Trainer itself logs. A NaN stays NaN
  (the Trainer's ``logging_nan_inf_filter`` applies only to its logs), and ``logging_steps`` does not matter.
  Only when the model's outputs carry no loss (a custom ``compute_loss``) does the loss come from
  ``on_log`` (``logs["loss"]``, the mean since the previous log).
- The framework's ``GradScaler`` (fp16 mixed precision; accelerate's, under the optimizer) is handed to
  :func:`gradscope.watch` as ``scaler=``, so the steps it skips are counted as skipped, not as NaNs.
- ``on_train_end``: the scope is closed and the final report kept in ``.report``. The Trainer has no
  exception event: after a failed ``train()`` call :meth:`GradscopeCallback.close` (the next
  ``train()`` also closes a scope left open).
- Files go to ``log_dir=``, or to ``<output_dir>/gradscope`` when the Trainer reports to TensorBoard.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
        self._hook: Any = None  # the forward hook that reads each training forward's loss
        self._pending: list[torch.Tensor] = []  # losses of the micro-batches of the step in progress
        self._window_normalized = False  # the model divided each loss by the window's token count
        self._steps_attached = 0  # steps whose loss was handed over
        self._hook_losses = False  # the model's outputs carried a loss at least once

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()  # a previous train() that failed before its end
        model = kwargs.get("model")
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"GradscopeCallback needs the Trainer's torch model, got {type(model).__name__}")
        optimizer = kwargs.get("optimizer")
        self.report = None
        options = dict(self.watch_options)
        scaler = framework_scaler(optimizer)
        if scaler is not None and options.get("scaler") is None:
            options["scaler"] = scaler  # fp16: steps the scaler skips are skipped steps, not NaNs
        self.scope = watch(
            model,
            _torch_optimizer(optimizer) if optimizer is not None else None,
            log_dir=self._resolve_log_dir(args),
            every=self.every,
            console=self.console if state.is_world_process_zero else False,
            thresholds=self.thresholds,
            **options,
        )
        self._pending = []
        self._hook_losses = False
        self._steps_attached = self.scope.history.steps_seen
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """Keep the loss of a training forward on the device; never raises into the user's forward."""
        try:
            if not module.training or not torch.is_grad_enabled():
                return  # an evaluation forward: its loss is not a training step's
            loss = _loss_of(output)
            if loss is None:
                return
            self._hook_losses = True
            self._window_normalized = kwargs.get("num_items_in_batch") is not None
            # clone(): a 0-d result can share a larger storage, which a bare detach() would keep alive
            self._pending.append(loss.detach().reshape(()).float().clone())
        except Exception:  # an observer never breaks the run; the on_log fallback still applies
            self._pending = []

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        scope = self.scope
        if scope is None or scope.closed:
            return
        pending, self._pending = self._pending, []
        if not pending or scope.history.steps_seen <= self._steps_attached:
            return  # no optimizer step ended (nothing to attach to)
        self._steps_attached = scope.history.steps_seen
        stacked = torch.stack(pending)
        # What the Trainer logs for a step: micro-batch losses normalized over the window add up to it;
        # otherwise it is their mean.
        scope.step(loss=stacked.sum() if self._window_normalized else stacked.mean())

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
        if scope is None or scope.closed or not logs or "loss" not in logs or self._hook_losses:
            return  # with losses from the model's outputs, the logged mean (NaN filtered) adds nothing
        if scope.history.steps_seen == 0:
            return  # no optimizer step has ended yet: nothing to attach the loss to
        scope.step(loss=float(logs["loss"]))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the scope (hooks removed, files flushed) and keep its final report. Idempotent."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._pending = []
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


def framework_scaler(optimizer: Any) -> Any:
    """accelerate's GradScaler (fp16 mixed precision), kept on its ``AcceleratedOptimizer``; None without one."""
    seen = 0
    while optimizer is not None and seen < 8:
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and all(hasattr(scaler, a) for a in ("update", "get_scale", "step")):
            enabled = getattr(scaler, "is_enabled", lambda: True)
            return scaler if enabled() else None
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def _loss_of(output: Any) -> torch.Tensor | None:
    """The ``loss`` of a model output (a ModelOutput, a dict, or an object with ``.loss``), if it is 0-d."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
        return loss
    return None
