"""Scope: watch() -> step() -> report() -> close(). The one object that owns every hook gradscope adds.

Data flow: module/tensor/optimizer hooks call the StepCollector (on-device reductions) only on collected
steps; the end of a collected step makes one packed transfer into a StepRecord appended to the bounded
History; report() runs the analyzers over the History; reporters render the results.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import analyzers, distributed
from .config import DEFAULT_EVERY, DEFAULT_HISTORY, Thresholds, schedule_for, validate_options
from .errors import AlreadyWatchedError, GradscopeWarning, UsageError
from .findings import Report
from .hooks import selection
from .hooks.backward import BirthHooks
from .hooks.capture import ModuleHooks, eager
from .hooks.guard import KIND_TO_STAT, MODEL, Guard
from .hooks.handles import HandleSet
from .hooks.optimizer import after_first_call, call_first, closure_of, patch_scaler_update, with_closure
from .hooks.param_grads import ParamGradHooks, apply_pre_clip
from .schedule import Observer
from .stats.adam import adam_step_rms, is_adam
from .stats.collector import StepCollector, losses_to_host
from .stats.history import History
from .stats.params import UpdateProbe, param_batch
from .stats.records import LayerInfo, ParamInfo, StepRecord
from .stats.sentinel import Sentinel
from .stats.summary import layer_summary, run_summary

# Every module currently watched by an open scope (weak: a deleted model frees its entry).
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

# Pending loss values kept on the device before a transfer is forced (bounds memory when every is huge).
_MAX_PENDING_LOSSES = 4096


class Scope:
    """Watches a model's gradient flow. Create with :func:`gradscope.watch`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        every: int | None = DEFAULT_EVERY,
        console: Any = False,
        thresholds: Thresholds | None = None,
        *,
        histograms: bool = False,
        history: int = DEFAULT_HISTORY,
        scaler: Any = None,
        accumulation: int = 1,
    ) -> None:
        model = distributed.unwrap(model)  # DDP: watch the wrapped module, under its own names
        self._validate(model, optimizer, log_dir, every, thresholds, history)
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise UsageError(f"accumulation must be an int >= 1 (the micro-batches per optimizer step), got {accumulation!r}")
        # Gradient accumulation divides each micro-batch's loss by this before backward (nanoGPT does);
        # the loss given to step() is multiplied back, so the report shows the loss the program prints.
        self.accumulation = accumulation
        if scaler is not None and not all(hasattr(scaler, a) for a in ("update", "get_scale", "step")):
            raise UsageError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.model = model
        self.scaler = scaler
        self._combiner = distributed.combiner()
        if self._combiner is not None:
            self._combiner.on_disagree = self._ranks_disagree
        self._main = distributed.is_main_process()  # only rank 0 writes files and prints
        self.optimizers: list[torch.optim.Optimizer] = (
            [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        )
        self.every = every
        self.schedule = schedule_for(every)
        self.thresholds = thresholds or Thresholds()
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.console = console
        self.histograms = bool(histograms)
        self.closed = False

        self._handles = HandleSet()
        self._collector = StepCollector()
        self._step = 0  # index of the training step in progress
        self._last_collected = 0
        self._losses: list[tuple[int, torch.Tensor | float]] = []
        self._stepped: set[int] = set()  # ids of optimizers that stepped in the current step
        self._probes: list[UpdateProbe] = []
        self._writer: Any = None
        self._warned: set[str] = set()
        self._ended_since_update = False
        self._backward_since_end = False  # a backward reached a probe parameter since the last step ended
        self._in_step = False  # between an optimizer's step pre- and post-hook (closures run forwards there)
        self._probe_params: list[nn.Parameter] = []
        self.last_report: Report | None = None  # the latest report(), also the final one after close()

        self._all_params = list(model.named_parameters())
        # Trainable when watched: measured on every collected step, frozen or not at that step (a block
        # frozen mid-run is recorded as frozen, not as a parameter that lost its gradient).
        self._trainable = {n for n, p in self._all_params if p.requires_grad}
        self._named_params = [(n, p) for n, p in self._all_params if p.requires_grad]
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._param_ids = {n: i for i, n in self._param_names.items()}
        self.history = History(
            layers=self._layer_infos(),
            params=self._param_infos(),
            capacity=history,
            has_optimizer=bool(self.optimizers),
            optimizer_types=[type(o).__name__ for o in self.optimizers],
        )
        self._guard = Guard(self.history.unmeasured, {n: i.type for n, i in self.history.layers.items()})
        self._modules = ModuleHooks(
            self._collector, self._handles, self.history.layers, self.histograms, self._guard
        )
        # Blind spots (docs/schedule.md): per-step sentinels feed the schedule's bursts; on collected steps,
        # gradients as backward produced them and the finiteness of what came into each module.
        self._sentinel = Sentinel()
        self._observer = Observer()
        self._adaptive = self.schedule.adaptive and self._combiner is None  # ranks must agree on steps
        self._param_grads = ParamGradHooks(self._named_params)
        self._param_grads.enabled = self._combiner is None  # DDP averages after these hooks fire
        self._births = BirthHooks(
            self._handles, skip=frozenset(n for n, m in model.named_modules() if isinstance(m, selection.ELEMENTWISE))
        )
        self._modules.births = self._births
        self._forward_seen = False
        self._probes_by_name: dict[str, list[torch.Tensor] | None] = {}
        for m in model.modules():
            _WATCHED.add(m)
        try:
            self._install()
        except BaseException:
            self.close()
            raise
        if self.log_dir is not None and self._main:
            self._open_writer()

    # --- construction ---------------------------------------------------------------------------------
    @staticmethod
    def _validate(model: Any, optimizer: Any, log_dir: Any, every: Any, thresholds: Any, history: Any) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"watch() needs a torch.nn.Module, got {type(model).__name__}")
        opts = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer] if optimizer is not None else []
        for opt in opts:
            if not isinstance(opt, torch.optim.Optimizer):
                raise UsageError(
                    f"optimizer must be a torch.optim.Optimizer or a list of them, got {type(opt).__name__}"
                )
        validate_options(every, thresholds, log_dir)
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise UsageError(f"history must be an int >= 1, got {history!r}")
        if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            raise UsageError(
                "watch() got a model already compiled by torch.compile, whose graph would skip gradscope's "
                "hooks; call gradscope.watch(model) first and torch.compile(model) after it"
            )
        already = [m for m in model.modules() if m in _WATCHED]
        if already:
            raise AlreadyWatchedError(
                "this model (or one of its modules) is already watched by an open gradscope scope; "
                "close() that scope first, or watch the model once"
            )

    def _layer_infos(self) -> dict[str, LayerInfo]:
        infos: dict[str, LayerInfo] = {}
        for name, module in self.model.named_modules():
            infos[name] = LayerInfo(
                name=name,
                type=type(module).__name__,
                role=selection.role_of(module),
                params=[f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)],
                saturation=selection.band_for(module),
            )
        return infos

    def _param_infos(self) -> dict[str, ParamInfo]:
        in_opt = self._optimizer_param_ids()
        infos: dict[str, ParamInfo] = {}
        for mname, module in self.model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if full not in self._param_names.values():
                    continue  # a tied parameter: reported once, under its first name
                infos[full] = ParamInfo(
                    name=full,
                    layer=mname,
                    # a lazy module's parameter has no shape until its first forward
                    shape=() if _uninitialized(p) else tuple(p.shape),
                    numel=0 if _uninitialized(p) else p.numel(),
                    dtype=str(p.dtype).replace("torch.", ""),
                    requires_grad=p.requires_grad,
                    in_optimizer=(id(p) in in_opt) if self.optimizers else None,
                    group=in_opt.get(id(p)),
                )
        return infos

    def _optimizer_param_ids(self) -> dict[int, int]:
        groups: dict[int, int] = {}
        index = 0
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    groups.setdefault(id(p), index)
                index += 1
        return groups

    def _install(self) -> None:
        self._modules.install(self.model)
        self._handles.keep(self.model.register_forward_pre_hook(self._on_model_forward))
        self._modules.collecting = self.schedule(0, self._observer.state)
        if self._collecting:
            self._param_grads.arm(self._handles)
        for opt in self.optimizers:
            self._handles.keep(opt.register_step_pre_hook(self._on_pre_step))
            self._handles.keep(opt.register_step_post_hook(self._on_post_step))
        if self.optimizers:
            self._install_skip_detection()
        if self.scaler is not None:
            self._handles.keep(patch_scaler_update(self.scaler, self._on_scaler_update))

    def _install_skip_detection(self) -> None:
        """A step whose gradients are thrown away without ``optimizer.step()`` (as GradScaler does after an
        overflow) is a skipped step. Seen without the scaler: a backward reached the first or last trainable
        parameter, then the gradients were cleared (``zero_grad``, or a training forward found them gone)
        before any optimizer stepped."""
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"] if p.requires_grad]
        probes = list({id(p): p for p in params[:1] + params[-1:]}.values())
        for p in probes:
            if hasattr(p, "register_post_accumulate_grad_hook"):
                self._handles.keep(p.register_post_accumulate_grad_hook(eager(self._on_probe_grad)))
                self._probe_params.append(p)
        if not self._probe_params:
            return
        for opt in self.optimizers:
            self._handles.keep(call_first(opt, "zero_grad", self._on_zero_grad))
        self._handles.keep(self.model.register_forward_pre_hook(eager(self._on_root_forward)))

    def _on_probe_grad(self, param: torch.Tensor) -> None:
        self._backward_since_end = True

    def _on_zero_grad(self) -> None:
        self._guard.call(MODEL, "scaler", self._end_if_discarded, True)

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        if not (self._backward_since_end and module.training and torch.is_grad_enabled()):
            return
        if all(p.grad is None for p in self._probe_params):  # cleared since that backward
            self._guard.call(MODEL, "scaler", self._end_if_discarded)

    def _end_if_discarded(self, check: bool = False) -> None:
        """Gradients of a backward are being discarded before any optimizer stepped. That is a skipped step
        when they were not finite (what GradScaler skips); finite ones thrown away on purpose (another,
        unwatched optimizer's backward through these parameters, as in a GAN) are not. ``check``: the
        gradients are still there to look at (one sync, on this rare path only). In a distributed run the
        check is left out: sharded gradients differ by rank, and every rank must end the same steps."""
        if not self._backward_since_end or self._in_step or self._stepped:
            return
        if check and self._combiner is None and _all_finite([p.grad for _, p in self._named_params]):
            self._backward_since_end = False
            return
        self._end_step(skipped=True)

    @property
    def _collecting(self) -> bool:
        return self._modules.collecting

    # --- optimizer hooks ------------------------------------------------------------------------------
    def _on_model_forward(self, module: nn.Module, inputs: Any) -> None:
        self._forward_seen = True  # a burst may start mid-step only before the step's forward

    def _on_pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        if id(opt) in self._stepped:
            self._end_step()  # the same optimizer stepped again: the previous step is over
        self._in_step = True
        self._push_grad_norm(opt, args, kwargs)
        if not self._collecting:
            return None
        try:
            closure, pos = closure_of(opt, args, kwargs)
        except Exception as exc:
            self._guard.fail(MODEL, "parameters", exc)
            return None
        if callable(closure):
            # step(closure) (LBFGS, Lightning) runs forward and backward inside step(): the gradients
            # exist only once the closure has run, so read them right after its first call.
            snapshot = functools.partial(self._snapshot, opt)
            return with_closure(args, kwargs, pos, after_first_call(closure, snapshot))
        self._snapshot(opt)
        return None

    def _snapshot(self, opt: torch.optim.Optimizer) -> None:
        """Gradients and weights as the optimizer is about to use them, and a copy for the update probe."""
        self._param_grads.freeze()
        self._guard.call(MODEL, "parameters", self._read_params)
        self._guard.call(MODEL, "updates", self._start_probe, opt)

    def _read_params(self) -> None:
        if self._collector.params is None:
            named = [(n, p) for n, p in self._all_params if p.requires_grad or n in self._trainable]
            batch = param_batch(named)
            batch.frozen = [not p.requires_grad for _, p in named]
            self._collector.params = batch

    def _start_probe(self, opt: torch.optim.Optimizer) -> None:
        named = [
            (self._param_names.get(id(p), "?"), p)
            for group in opt.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        self._probes.append(UpdateProbe(named))

    def _on_post_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_step = False
        if self._collecting and self._probes:
            probe = self._probes.pop()
            self._guard.call(MODEL, "updates", self._finish_probe, opt, probe)
        self._stepped.add(id(opt))
        if len(self._stepped) >= len(self.optimizers):
            self._end_step()

    def _finish_probe(self, opt: torch.optim.Optimizer, probe: UpdateProbe) -> None:
        params = self._collector.params
        names, sq = probe.finish()
        if params is None:
            return
        params.update_names.extend(names)
        params.update_sq.append(sq)
        if is_adam(opt):  # evidence for update_ratio: Adam's effective per-element step size
            names, rms = adam_step_rms(opt, self._param_names)
            params.adam_names.extend(names)
            params.adam_rms.append(rms)

    def _on_scaler_update(self) -> None:
        """GradScaler.update(): if no optimizer step ended the training step, the scaler skipped it."""
        self._guard.call(MODEL, "scaler", self._scaler_updated)

    def _scaler_updated(self) -> None:
        if not self._ended_since_update and (self.optimizers or self._collector.acts):
            self._end_step(skipped=True)
        self._ended_since_update = False

    def _grad_scale(self) -> torch.Tensor | None:
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        if not isinstance(scale, torch.Tensor) or not self.scaler.is_enabled():
            return None
        return scale  # the scale this step's backward used: update() has not run yet

    # --- steps ----------------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """End a training step (without an optimizer), or attach ``loss`` to the step that just ended."""
        if self.closed:
            return
        if loss is not None:
            # clone(): a reduction's 0-d result can share a large storage (mse_loss's on the CPU holds
            # 256 KiB); kept until the next collected step, a bare detach() would keep all of that alive.
            value = loss.detach().clone() if isinstance(loss, torch.Tensor) else float(loss)
            if self.accumulation != 1:
                value = value * self.accumulation
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise UsageError(f"step(loss=...) needs a scalar loss, got a tensor of shape {tuple(value.shape)}")
            # With an optimizer the step already ended at optimizer.step(): the loss belongs to it.
            owner = self._step - 1 if self.optimizers else self._step
            self._losses.append((max(owner, 0), value))
            self._sentinel.push(max(owner, 0), "loss", value)
            if len(self._losses) >= _MAX_PENDING_LOSSES:
                self._flush_losses()
        if not self.optimizers:
            self._push_grad_norm(None)
            self._end_step()
        else:
            self._observe()

    # --- sentinels and the schedule -------------------------------------------------------------------
    def _push_grad_norm(self, opt: torch.optim.Optimizer | None, args: Any = (), kwargs: Any = None) -> None:
        """The sentinel's global gradient norm of this step (one fused reduction, no host sync). A collected
        step measures every parameter's gradient anyway: its record gives the norm (_finish_record)."""
        if self._collecting:
            return
        try:
            if opt is not None and callable(closure_of(opt, args, kwargs or {})[0]):
                return  # step(closure): the gradients are computed inside step(), after this hook
            if opt is None:
                params, name = [p for _, p in self._named_params], "grad_norm"
            else:
                params = [p for g in opt.param_groups for p in g["params"]]
                index = next((i for i, o in enumerate(self.optimizers) if o is opt), 0)
                name = "grad_norm" if index == 0 else f"grad_norm:{index}"
            self._sentinel.push_grad_norm(self._step, params, name, probe=self._probe_for(name, params))
        except Exception as exc:
            self._sentinel.enabled = False
            self._guard.fail(MODEL, "sentinels", exc)

    def _probe_for(self, name: str, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The smallest parameter of the earliest layer (in forward order) among ``params``: a non-finite
        gradient born anywhere in backward flows back to it, so reading it every step dates such a NaN
        exactly on the steps where the full norm is skipped (stats/sentinel.py). Chosen once layers ran."""
        if name in self._probes_by_name:
            return self._probes_by_name[name]
        if self.history.first is None:
            return None  # forward order unknown until the first collected step
        order = self.history.layer_order()
        owned = {id(p) for p in params}
        candidates = [
            (order.get(info.layer, 1 << 30), info.numel, pname)
            for pname, info in self.history.params.items()
            if self._param_ids.get(pname) in owned
        ]
        probe = None
        if candidates:
            pid = self._param_ids[min(candidates)[2]]
            probe = [p for p in params if id(p) == pid][:1]
        self._probes_by_name[name] = probe
        return probe

    def _sentinel_from(self, record: StepRecord) -> None:
        """The global gradient norm the optimizer received, from a collected step's parameter norms."""
        sq = [
            (p.grad_norm_clipped if p.grad_norm_clipped is not None else p.grad_norm) ** 2
            for p in record.params.values()
            if p.grad_norm is not None
        ]
        if sq and not record.skipped:
            total = math.sqrt(math.fsum(sq)) if all(map(math.isfinite, sq)) else math.nan
            self._sentinel.push(record.step, "grad_norm", total)

    def _observe(self) -> None:
        """Read the sentinels that have landed; start a burst now if one covers the step in progress."""
        try:
            for step, name, value in self._sentinel.poll():
                self.history.sentinel.add(step, name, value)
                if self._adaptive and self._observer.observe(step, name, value):
                    self.history.sentinel.bursts[:] = self._observer.bursts
        except Exception as exc:
            self._sentinel.enabled = False
            self._guard.fail(MODEL, "sentinels", exc)
            return
        if not self._collecting and not self._forward_seen and self.schedule(self._step, self._observer.state):
            self._modules.collecting = True
            self._param_grads.arm(self._handles)

    def _end_step(self, skipped: bool = False) -> None:
        if self._collecting:
            try:
                self._finish_record(skipped)
            except Exception as exc:  # statistics must never break training
                self._guard.fail(MODEL, "steps", exc)
        elif skipped:
            self.history.add_skipped(self._step)
        self._ended_since_update = True
        self._backward_since_end = False
        self._handles.end_step()
        self._collector.reset()
        self._births.reset()
        self._param_grads.take()
        self._probes.clear()
        self._stepped.clear()
        self._step += 1
        self._guard.step = self._step
        self.history.steps_seen = self._step
        self._forward_seen = False
        self._modules.collecting = False
        self._observe()  # sentinels of the step that just ended may start a burst at this one
        if not self._collecting and self.schedule(self._step, self._observer.state):
            self._modules.collecting = True
            self._param_grads.arm(self._handles)

    def _finish_record(self, skipped: bool = False) -> None:
        self._guard.call(MODEL, "parameters", self._read_params)
        self._refresh_optimizer_membership()
        lrs, param_lr = self._learning_rates()
        # started before the engine's transfer, which lands them too (one sync per collected step on a GPU)
        pre = self._guard.call(MODEL, "pre-clip gradients", self._param_grads.take, self._grad_scale())
        self._births.begin()
        record, losses = self._collector.flush(
            self._step,
            losses=self._losses,
            loss_window=self._step - self._last_collected,
            lrs=lrs,
            param_lr=param_lr,
            grad_scale=self._grad_scale(),
            combiner=self._combiner,
            on_error=self._statistic_failed,
        )
        self._losses = []
        record.skipped = skipped
        for name, order in self._collector.agreed_order.items():  # distributed: every rank orders alike
            if name in self.history.layers:
                self.history.layers[name].order = order
        if pre is not None:
            self._guard.call(MODEL, "pre-clip gradients", apply_pre_clip, record, pre)
        record.inputs = self._births.take()
        self._sentinel_from(record)
        saw_forward, self._modules.forwards_seen = self._modules.forwards_seen, False
        if not saw_forward and any(p.grad_norm is not None for p in record.params.values()):
            self._warn_once(
                "no-forward",
                f"gradscope saw gradients but no forward pass in step {self._step}: if this model was compiled "
                "with torch.compile before watch(), its compiled graph skips the hooks; watch it before compiling",
            )
        # Losses of earlier, uncollected steps first: a NaN loss at step 25 precedes a NaN output at step 30.
        self._record_losses(losses, pending=record)
        self.history.add(record)
        self._last_collected = self._step
        self._write(record)

    def _ranks_disagree(self, keys: set) -> None:
        layers = sorted({k.layer or "(model)" for k in keys})
        self._warn_once(
            "ranks-disagree",
            f"gradscope: ranks measured statistics of different sizes in step {self._step} "
            f"(layers {', '.join(layers[:5])}); those stay each rank's own, not combined across ranks",
        )

    def _statistic_failed(self, kind: str, layer: str, exc: BaseException) -> None:
        self._guard.fail(layer, KIND_TO_STAT.get(kind, kind), exc)

    def _flush_losses(self) -> None:
        """Move pending loss values to the host (one transfer): at report time or when many are pending."""
        if not self._losses or self._combiner is not None:
            return  # distributed: only losses combined across ranks at collected steps, so reports agree
        values = losses_to_host(self._losses)
        self._losses = []
        self._record_losses(values)

    def _flush_eval(self) -> None:
        """Evaluation forwards seen since the last collected step join the latest record."""
        pending = self._collector.flush_eval()
        if pending and self.history.last is not None:
            self.history.last.eval_norms.update(pending)

    def _record_losses(self, values: list[tuple[int, float]], pending: StepRecord | None = None) -> None:
        by_step = {r.step: r for r in self.history.records}
        if pending is not None:
            by_step[pending.step] = pending
        for s, v in values:
            self.history.add_loss(s, v)
            if s in by_step:
                by_step[s].loss = v
        if values and self._writer is not None:
            self._call_writer("write_losses", values)

    def _refresh_optimizer_membership(self) -> None:
        if not self.optimizers:
            return
        groups = self._optimizer_param_ids()
        for name, info in self.history.params.items():
            p_id = self._param_ids.get(name)
            info.in_optimizer = p_id in groups
            info.group = groups.get(p_id) if p_id is not None else None

    def _learning_rates(self) -> tuple[list[float], dict[str, float]]:
        lrs: list[float] = []
        param_lr: dict[str, float] = {}
        for opt in self.optimizers:
            for group in opt.param_groups:
                lr = group.get("lr")
                if lr is None:
                    continue
                lr = float(lr)  # a tensor lr (capturable optimizers) is read once, on collected steps only
                lrs.append(lr)
                for p in group["params"]:
                    name = self._param_names.get(id(p))
                    if name is not None:
                        param_lr.setdefault(name, lr)
        return lrs, param_lr

    # --- results --------------------------------------------------------------------------------------
    def report(self) -> Report:
        """Analyze everything collected so far. Callable any time, any number of times."""
        self._flush_losses()
        self._flush_eval()
        findings = analyzers.analyze(self.history, self.thresholds)
        report = Report(findings=findings, steps=self.history.steps_seen, layers=layer_summary(self.history))
        self._publish(report)
        self.last_report = report
        return report

    def summary(self) -> dict[str, Any]:
        """Run-level context for reporters: loss at start and end, learning rates."""
        return run_summary(self.history)

    def print_report(self, console: Any = None) -> Report:
        """Print the rich terminal report now; returns the report it printed."""
        from .reporters.terminal import print_report

        report = self.report()
        target = console if console is not None else (self.console if not isinstance(self.console, bool) else None)
        print_report(report, target, summary=self.summary())
        return report

    def _publish(self, report: Report) -> None:
        if self.log_dir is None or not self._main:
            return
        try:
            from .reporters.json import write_json

            write_json(report, self.log_dir / "gradscope.json", summary=self.summary())
        except Exception as exc:
            self._warn_once("json", f"gradscope could not write gradscope.json: {exc!r}")
        if self._writer is not None:
            self._call_writer("write_report", report)

    # --- files ----------------------------------------------------------------------------------------
    def _open_writer(self) -> None:
        try:
            from .reporters.tensorboard import TensorBoardWriter

            self._writer = TensorBoardWriter(self.log_dir, histograms=self.histograms)
        except Exception as exc:
            self._warn_once("tensorboard", f"gradscope will not write TensorBoard logs: {exc!r}")
            self._writer = None

    def _write(self, record: StepRecord) -> None:
        if self._writer is not None:
            self._call_writer("write_record", self.history, record)

    def _call_writer(self, method: str, *args: Any) -> None:
        fn = getattr(self._writer, method, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # the writer already warns on OSError; anything else must not stop training
            self._warn_once("tensorboard", f"gradscope stopped writing TensorBoard logs: {exc!r}")
            self._writer = None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, GradscopeWarning, stacklevel=3)

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook gradscope added, flush files, print the report if asked. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._handles.remove_all()
        self._probes.clear()
        self._collector.reset()
        for m in self.model.modules():
            _WATCHED.discard(m)
        try:
            report = self.report()  # the final report: files rewritten, kept as last_report
            if self.console and self._main:
                from .reporters.terminal import print_report

                target = None if isinstance(self.console, bool) else self.console
                print_report(report, target, summary=self.summary())
        except Exception as exc:  # closing must always release the model, even if reporting fails
            self._warn_once("close", f"gradscope could not write its final report: {exc!r}")
        finally:
            if self._writer is not None:
                try:
                    self._writer.close()
                except Exception as exc:
                    self._warn_once("tensorboard", f"gradscope could not close TensorBoard logs: {exc!r}")
                self._writer = None

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"Scope({type(self.model).__name__}, step={self._step}, {self.schedule.describe()}, {state})"


def _all_finite(grads: list[torch.Tensor | None]) -> bool:
    """Whether every gradient is finite (norms are; a NaN or Inf anywhere makes its norm non-finite)."""
    dense = [distributed.local(g.detach()) for g in grads if g is not None]
    dense = [g.coalesce().values() if g.is_sparse else g for g in dense]
    if not dense:
        return True
    norms = torch._foreach_norm(dense)
    return bool(torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all())


def _uninitialized(p: torch.Tensor) -> bool:
    return isinstance(p, nn.parameter.UninitializedTensorMixin)


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    every: int | None = DEFAULT_EVERY,
    console: Any = False,
    thresholds: Thresholds | None = None,
    **options: Any,
) -> Scope:
    """Attach gradscope to ``model``; see ../shared/CONTRACT.md.

    Extra options: ``histograms`` (sampled histograms to TensorBoard), ``history`` (collected steps kept),
    ``accumulation`` (the losses given to ``step()`` were divided by this many micro-batches: multiply back),
    ``scaler`` (a torch.amp.GradScaler: gradients are reported unscaled, skipped steps counted).
    """
    return Scope(model, optimizer, log_dir, every, console, thresholds, **options)
