"""Per-step, on-device accumulation of statistics, and the one packed transfer that ends a collected step.

Hooks call ``add_*`` with live tensors; each call reduces to a few numbers that stay on the device, held
by name in a per-layer accumulator. At the end of a collected step :meth:`StepCollector.flush` puts every
named statistic into a typed :class:`~gradscope.stats.packing.Pack`, moves it to the host once (combining
the rank-agreed part across ranks in a distributed run) and builds a
:class:`~gradscope.stats.records.StepRecord` by reading the same names back.

Adding a per-layer statistic is one place: declare the field on the record dataclass (ActivationStats,
GradStats, NormStats or ParamStats) and, in a hook, call :meth:`StepCollector.add_field` (or
:meth:`StepCollector.add_param_field`) with the field's name and how calls and ranks combine it.

Accumulation is always out of place: a value reduced under ``torch.inference_mode()`` is an inference
tensor, which no later update outside that mode may write into.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import reductions as R
from .packing import LOCAL, MAX, SUM, Entry, Key, Pack, Values
from .records import ActivationStats, GradStats, NormStats, ParamStats, StepRecord

#: What a failing statistic reports: (kind, layer, exception).
OnError = Callable[[str, str, BaseException], None]

# Element counts travel through the float32 buffer of a distributed run in two exact parts (high, low):
# a float32 holds integers exactly only up to 2**24, and a large activation has more elements than that.
_COUNT_SPLIT = 2**20

# Record fields filled by the typed builders below; any other field an accumulator holds is copied onto
# the record dataclass field of the same name (see add_field).
_BUILT = {"sums", "maxes", "count", "order", "sample"}


@dataclass
class _Acc:
    """One (kind, layer)'s statistics of this step as named device tensors, plus host-side counts."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    combine: dict[str, str] = field(default_factory=dict)
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    numel: int = 0
    calls: int = 0
    order: int = 0  # backward firing order (gradients); forward call order is kept by the scope

    def put(self, name: str, combine: str, t: torch.Tensor, slots: tuple[str, ...] = ()) -> None:
        """Merge one call's value: added (SUM), elementwise max (MAX) or the first call's kept (LOCAL)."""
        prev = self.values.get(name)
        if prev is None:
            self.values[name], self.combine[name], self.names[name] = t, combine, slots
            return
        if combine == LOCAL and self.combine[name] == LOCAL:
            return  # the first call's (a histogram sample), whatever the later calls' sizes
        if combine != self.combine[name] or slots != self.names[name] or prev.shape != t.shape:
            raise ValueError(f"statistic {name!r} changed its layout within a step")
        if combine == SUM:
            self.values[name] = prev + t  # out of place: prev may be an inference tensor
        else:
            self.values[name] = torch.maximum(prev, t)

    def pack(self, pack: Pack, kind: str, layer: str) -> None:
        for name, t in self.values.items():
            pack.put(Key(kind, layer, name), self.combine[name], t, self.names[name])


@dataclass
class ParamBatch:
    """Parameter statistics of one step, as device vectors aligned with ``names``."""

    names: list[str]  # every trainable parameter
    grad_names: list[str]  # those that have a gradient this step
    grad_sq: torch.Tensor  # (len(grad_names),) squared grad norm; NaN/Inf if the grad held any
    has_grad: list[bool]  # aligned with names
    weight_sq: torch.Tensor  # (len(names),)
    sharded: bool = False  # FSDP: local shards, whose squared norms add up across ranks
    update_names: list[str] = field(default_factory=list)
    update_sq: list[torch.Tensor] = field(default_factory=list)  # one (Q_i,) vector per optimizer step
    adam_names: list[str] = field(default_factory=list)
    # RMS of lr / (sqrt(v_hat) + eps), one vector per Adam step
    adam_rms: list[torch.Tensor] = field(default_factory=list)
    frozen: list[bool] = field(default_factory=list)  # aligned with names: requires_grad off this step


class StepCollector:
    """Accumulates one step's statistics; ``flush()`` turns them into a host-side StepRecord."""

    def __init__(self) -> None:
        self.acts: dict[str, _Acc] = {}
        self.grads: dict[str, _Acc] = {}
        self.norms: dict[str, _Acc] = {}
        self.eval_norms: dict[str, _Acc] = {}
        self.param_fields: dict[str, _Acc] = {}  # per parameter name: fields added with add_param_field
        self.params: ParamBatch | None = None
        self._grad_order = 0
        # Distributed runs: each layer's forward order as the ranks agreed on it at the last flush (the
        # earliest any rank saw it run), so that every rank orders its report's layers alike.
        self.agreed_order: dict[str, int] = {}

    def reset(self) -> None:
        self.acts.clear()
        self.grads.clear()
        self.norms.clear()
        self.param_fields.clear()
        self.params = None
        self._grad_order = 0

    def drop(self, kind: str, layer: str) -> None:
        """Forget what one layer gathered this step (its statistic failed part-way)."""
        table = {"act": self.acts, "grad": self.grads, "norm": self.norms, "eval_norm": self.eval_norms}
        table.get(kind, self.param_fields).pop(layer, None)

    def _acc(self, table: dict[str, _Acc], layer: str) -> _Acc:
        acc = table.get(layer)
        if acc is None:
            acc = table[layer] = _Acc()
        return acc

    # --- forward ----------------------------------------------------------------------------------
    def add_activation(
        self,
        layer: str,
        x: torch.Tensor,
        *,
        band: tuple[float, float] | None,
        count_neg: bool,
        unit_dim: int | None,
        sample: bool,
        unit_max_dim: int | None = None,
        order: int = 0,
    ) -> None:
        """One output tensor of a module. ``unit_dim``: per-unit alive masks (relu-like modules);
        ``unit_max_dim``: per-unit largest raw value (weighted layers)."""
        dim = unit_dim if unit_dim is not None else unit_max_dim
        acc = self._acc(self.acts, layer)
        acc.order = order
        if dim is None:
            sums, maxes = R.activation_stats(x, band=band, count_neg=count_neg)
        else:
            # Per-unit largest value, from the same pass: with unit_dim (relu-like) > 0 means alive (for
            # outputs that can be negative, the largest |value|); with unit_max_dim the raw maximum.
            absolute = unit_dim is not None and count_neg
            sums, maxes, units = R.activation_stats(
                x, band=band, count_neg=count_neg, unit_dim=dim, unit_abs=absolute
            )
            # one vector per width: a shared module applied at several widths keeps every one
            if unit_dim is not None:
                acc.put(f"alive/{units.numel()}", MAX, units)
            if unit_max_dim is not None:
                top = units if unit_max_dim == unit_dim and not absolute else None
                if top is None:
                    top = R.unit_absmax(x, unit_max_dim, nonnegative=True)  # nonnegative: no abs, raw max
                acc.put(f"unit_max/{top.numel()}", MAX, top)
        acc.put("sums", SUM, sums, R.act_sum_slots(count_neg=count_neg, band=band is not None))
        acc.put("maxes", MAX, maxes, R.ACT_MAX_SLOTS)
        if sample:
            acc.put("sample", LOCAL, R.strided_sample(x))
        acc.numel += x.numel()
        acc.calls += 1

    def add_norm_input(self, layer: str, module: torch.nn.Module, x: torch.Tensor, *, training: bool) -> None:
        """A normalization layer's input against its running statistics, before this batch updates them.

        Training forwards: per call, the gap between this batch's per-channel statistics and the running
        ones (what BatchNorm normalizes with is the batch). Evaluation forwards: per-channel moments pooled
        over every evaluation call since the last collected step, compared at the end: evaluating one
        sample at a time has no per-call variance, but the pooled inputs do.
        """
        target = self.norms if training else self.eval_norms
        xd = x.detach()
        rm = getattr(module, "running_mean", None)
        rv = getattr(module, "running_var", None)
        eps_attr = getattr(module, "eps", None)  # RMSNorm's default eps is None (the dtype's epsilon)
        eps = float(eps_attr) if isinstance(eps_attr, (int, float)) else 1e-5
        running = isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) and xd.dim() >= 2
        if xd.dim() >= 2:
            sumsq, mean, var = R.norm_input_stats(xd)  # one pass, no fp32 copy of the input
        else:
            sumsq, mean, var = R.sum_of_squares(xd), None, None
        acc = self._acc(target, layer)
        sums_l, sum_names = [sumsq.reshape(())], ["sumsq"]
        maxes_l: list[torch.Tensor] = []
        max_names: list[str] = []
        if running:
            rvf, rmf = rv.detach().float(), rm.detach().float()  # type: ignore[union-attr]
            if training:
                gap = (mean - rmf).abs() / torch.sqrt(rvf + eps)  # (C,)
                lvr = torch.log((var + eps) / (rvf + eps)).abs()  # (C,)
                sums_l += [gap.mean(), lvr.mean()]
                sum_names += ["gap_mean", "lvr_mean"]
                maxes_l += [gap.max(), lvr.max()]
                max_names += ["gap_max", "lvr_max"]
            else:
                n = float(xd.numel() // xd.shape[1])
                d = mean - rmf  # (C,) measured from the running mean: little cancellation when close
                acc.put("pool_n", SUM, torch.full((1,), n, device=d.device))
                acc.put("pool_d", SUM, d * n)
                acc.put("pool_q", SUM, (var + d * d) * n)
                acc.put("pool_rv", LOCAL, rvf)
                acc.put("pool_eps", LOCAL, torch.full((1,), eps, device=d.device))
            maxes_l.append(-rvf.min())
            max_names.append("neg_rv_min")
        for attr in ("weight", "bias"):
            t = getattr(module, attr, None)
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                tf = t.detach().float()
                maxes_l.append(tf.square().mean().sqrt())
                max_names.append(f"{attr}_rms")
                if attr == "weight":  # per-channel worst gains: a few small reductions over the gain
                    a = tf.abs()
                    maxes_l += [-a.min(), a.max()]
                    max_names += ["neg_weight_absmin", "weight_absmax"]
        acc.put("sums", SUM, torch.stack(sums_l), tuple(sum_names))
        acc.put("maxes", MAX, torch.stack(maxes_l) if maxes_l else sumsq.new_zeros(0), tuple(max_names))
        acc.numel += x.numel()
        acc.calls += 1

    # --- backward ---------------------------------------------------------------------------------
    def add_grad(self, layer: str, g: torch.Tensor, *, sample: bool, unit_dim: int | None = None) -> None:
        """The gradient of one module output; ``unit_dim``: also per-unit largest |gradient|."""
        acc = self.grads.get(layer)
        if acc is None:
            acc = self.grads[layer] = _Acc(order=self._grad_order)
            self._grad_order += 1
        if unit_dim is None:
            sums, maxes = R.grad_stats(g)
        else:
            sums, maxes, units = R.grad_stats(g, unit_dim)  # per-unit largest |gradient|, same pass
            acc.put(f"unit_absmax/{units.numel()}", MAX, units)
        acc.put("sums", SUM, sums, R.GRAD_SUM_SLOTS)
        acc.put("maxes", MAX, maxes, R.GRAD_MAX_SLOTS)
        if sample:
            acc.put("sample", LOCAL, R.strided_sample(g))
        acc.numel += g.numel()
        acc.calls += 1

    # --- any other statistic ----------------------------------------------------------------------
    def add_field(self, kind: str, layer: str, name: str, value: torch.Tensor, combine: str = SUM) -> None:
        """A statistic of a layer that fills the record field ``name`` of that kind's dataclass
        ("act": ActivationStats, "grad": GradStats, "norm": NormStats). ``combine``: SUM adds calls and
        ranks, MAX keeps the largest, LOCAL keeps this rank's first. A one-element value becomes a number
        (an int when the field is declared int), a longer one a numpy array. The layer's record exists
        only when its main statistic (its outputs, its gradient, its norm input) was measured as well."""
        table = {"act": self.acts, "grad": self.grads, "norm": self.norms}[kind]
        self._acc(table, layer).put(name, combine, value.detach().float().reshape(-1))

    def add_param_field(self, param: str, name: str, value: torch.Tensor, combine: str = SUM) -> None:
        """A statistic of one parameter that fills ``ParamStats.<name>`` (see add_field)."""
        self._acc(self.param_fields, param).put(name, combine, value.detach().float().reshape(-1))

    # --- the packed transfer ----------------------------------------------------------------------
    def flush_eval(self) -> dict[str, NormStats]:
        """Evaluation-forward norm statistics gathered since the last collected step (report time)."""
        if not self.eval_norms:
            return {}
        pack = Pack()
        for name, acc in self.eval_norms.items():
            acc.pack(pack, "eval_norm", name)
        values = pack.transfer(None)
        out = {name: _norm(values, "eval_norm", name, acc, False) for name, acc in self.eval_norms.items()}
        self.eval_norms.clear()
        return out

    def flush(
        self,
        step: int,
        *,
        losses: list[tuple[int, torch.Tensor | float]] | None = None,
        loss_window: int = 1,
        lrs: list[float] | None = None,
        param_lr: dict[str, float] | None = None,
        grad_scale: torch.Tensor | None = None,
        combiner: Combiner | None = None,
        on_error: OnError | None = None,
    ) -> tuple[StepRecord, list[tuple[int, float]]]:
        """One device-to-host transfer for everything this step gathered; returns the record and losses.

        With a ``combiner`` (a distributed run) the ranks first agree on the layout of the shared part,
        then combine it, so every rank unpacks the same numbers; evaluation statistics and histogram
        samples stay each rank's own. A statistic that fails to pack or unpack is reported to
        ``on_error`` and left out; the rest of the step is still recorded.
        """
        distributed = combiner is not None
        fail = on_error or _reraise
        pack = Pack()
        tables = (
            ("act", self.acts),
            ("grad", self.grads),
            ("norm", self.norms),
            ("pstat", self.param_fields),
        )
        for kind, table in tables:
            for name, acc in list(table.items()):
                try:
                    acc.pack(pack, kind, name)
                    if distributed and kind != "pstat":
                        _pack_counts(pack, kind, name, acc)
                except Exception as exc:
                    pack.drop_layer(kind, name)
                    fail(kind, name, exc)
        for name, acc in self.eval_norms.items():  # this rank's own evaluations: never combined
            for f, t in acc.values.items():
                pack.put(Key("eval_norm", name, f), LOCAL, t, acc.names[f])
        p = self.params
        if p is not None:
            try:
                _pack_params(pack, p)
            except Exception as exc:
                pack.drop_layer("param", "")
                fail("param", "", exc)
        if grad_scale is not None:
            pack.put(Key("scale", "", "value"), MAX, grad_scale.detach().float())
        loss_steps = _put_losses(pack, step, losses or [], loss_window, distributed=distributed)
        values = pack.transfer(combiner, combiner.device if combiner is not None else None)

        record = StepRecord(step=step, lrs=list(lrs or []))
        scale_v = values.get(Key("scale", "", "value"))
        scale = float(scale_v[0]) if scale_v is not None else 1.0
        builders: list[tuple[str, dict[str, _Acc], dict[str, Any], Callable[..., Any]]] = [
            ("act", self.acts, record.activations, lambda n, a: _activation(values, n, a)),
            ("grad", self.grads, record.gradients, lambda n, a: _gradient(values, n, a, scale)),
            ("norm", self.norms, record.norms, lambda n, a: _norm(values, "norm", n, a, True)),
        ]
        for kind, table, out, build in builders:
            names = values.layers(kind) if distributed else list(table)
            for name in names:
                try:
                    stats = build(name, table.get(name))
                    if stats is not None:
                        out[name] = stats
                except Exception as exc:
                    fail(kind, name, exc)
        for name, acc in self.eval_norms.items():
            try:
                record.eval_norms[name] = _norm(values, "eval_norm", name, acc, False)
            except Exception as exc:
                fail("eval_norm", name, exc)
        if p is not None and Key("param", "", "weight_sq") in values:
            try:
                _params(record, p, values, param_lr or {})
            except Exception as exc:
                fail("param", "", exc)
        self.agreed_order = {}
        if distributed:
            for name in values.layers("act"):
                v = values.get(Key("act", name, "order"))
                if v is not None and math.isfinite(float(v[0])):
                    self.agreed_order[name] = -int(v[0])
        for name in values.layers("pstat"):
            if name in record.params:
                _copy_fields(values, "pstat", name, record.params[name])
        self.eval_norms.clear()
        return record, _losses_from(values, loss_steps)


def _reraise(kind: str, layer: str, exc: BaseException) -> None:
    raise exc


class Combiner:
    """Combines the shared part of a packed buffer across the ranks of a process group.

    Ranks first agree on the layout (one all_gather of its length and hash; only when they differ, one
    exchange of the layouts themselves, whose union every rank then packs, filling what it did not measure
    with the combine rule's identity). A statistic that ranks measured with different sizes stays each
    rank's own, with one warning. Only then does the buffer itself enter an all_gather, so every rank
    always enters each collective with the same shape.
    """

    def __init__(self, group: object = None, device: torch.device | None = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.world = dist.get_world_size(group)
        self.device = device  # where collectives run (CUDA for NCCL); None: the buffer's own device
        self.on_disagree: Callable[[set[Key]], None] | None = None

    @staticmethod
    def layout_id(entries: list[Entry], device: torch.device) -> torch.Tensor:
        """(length, hash) of a layout as three int64s: what ranks compare before combining anything."""
        desc = [(e.key, e.combine, e.size, e.names) for e in entries]
        digest = hashlib.blake2b(repr(desc).encode(), digest_size=16).digest()
        return torch.tensor(
            [
                len(desc),
                int.from_bytes(digest[:8], "little", signed=True),
                int.from_bytes(digest[8:], "little", signed=True),
            ],
            dtype=torch.int64,
            device=device,
        )

    def agree(self, entries: list[Entry], device: torch.device) -> tuple[list[Entry], set[Key]]:
        device = self.device or device
        mine = self.layout_id(entries, device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        self.dist.all_gather(gathered, mine, group=self.group)
        if all(torch.equal(g, gathered[0]) for g in gathered):
            return entries, set()
        layouts: list[Any] = [None] * self.world
        self.dist.all_gather_object(
            layouts, [(tuple(e.key), e.combine, e.size, e.names) for e in entries], group=self.group
        )
        union: dict[Key, Entry] = {}
        conflicts: set[Key] = set()
        for layout in layouts:
            for key, combine, size, names in layout:
                key = Key(*key)
                seen = union.get(key)
                if seen is None:
                    union[key] = Entry(key, combine, size, tuple(names))
                elif (seen.combine, seen.size, seen.names) != (combine, size, tuple(names)):
                    conflicts.add(key)
        agreed = sorted((e for k, e in union.items() if k not in conflicts), key=lambda e: (e.combine, e.key))
        self.last_agreed = agreed
        if conflicts and self.on_disagree is not None:
            self.on_disagree(conflicts)
        return agreed, conflicts

    def combine(self, buf: torch.Tensor, sum_len: int) -> torch.Tensor:
        device = self.device or buf.device
        moved = buf.to(device)
        gathered = [torch.empty_like(moved) for _ in range(self.world)]
        self.dist.all_gather(gathered, moved, group=self.group)
        stacked = torch.stack(gathered)  # (world, len)
        out = torch.cat([stacked[:, :sum_len].sum(0), stacked[:, sum_len:].amax(0)])
        return out.to(buf.device)


def _pack_counts(pack: Pack, kind: str, name: str, acc: _Acc) -> None:
    """Element counts, calls and backward order, for a distributed run: ranks add them up (exactly)."""
    device = next(iter(acc.values.values())).device
    hi, lo = divmod(acc.numel, _COUNT_SPLIT)
    pack.put(
        Key(kind, name, "count"), SUM, torch.tensor([hi, lo, acc.calls], dtype=torch.float32, device=device)
    )
    if kind in ("act", "grad"):  # forward / backward order: the earliest any rank saw it
        pack.put(
            Key(kind, name, "order"), MAX, torch.tensor([-acc.order], dtype=torch.float32, device=device)
        )


def _counts(values: Values, kind: str, name: str, acc: _Acc | None) -> tuple[int, int]:
    v = values.get(Key(kind, name, "count"))
    if v is None:
        if acc is None:
            raise KeyError(f"no counts for {kind} {name!r}")
        return acc.numel, acc.calls
    return int(v[0]) * _COUNT_SPLIT + int(v[1]), int(v[2])


def _pack_params(pack: Pack, p: ParamBatch) -> None:
    """Parameter norms as vectors over every trainable parameter (one fixed layout on every rank), with
    a count of the ranks on which each had a gradient (or was updated) beside them."""
    half = SUM if p.sharded else MAX  # replicated parameters are identical on every rank; shards add up
    device = p.weight_sq.device
    index = {n: i for i, n in enumerate(p.names)}
    pack.put(Key("param", "", "weight_sq"), half, p.weight_sq)
    _scatter(pack, "grad_sq", "has_grad", half, index, p.grad_names, p.grad_sq, device)
    if p.update_sq:
        upd = torch.cat([u.reshape(-1).to(device) for u in p.update_sq])
        _scatter(pack, "update_sq", "updated", half, index, p.update_names, upd, device)
    if p.adam_rms:  # a per-rank RMS: the largest across ranks (identical for replicated params)
        rms = torch.cat([a.reshape(-1).to(device) for a in p.adam_rms])
        _scatter(pack, "adam_rms", "has_adam", MAX, index, p.adam_names, rms, device)


def _scatter(
    pack: Pack,
    field_name: str,
    flag: str,
    combine: str,
    index: dict[str, int],
    names: list[str],
    values: torch.Tensor,
    device: torch.device,
) -> None:
    pos = [(index[n], i) for i, n in enumerate(names) if n in index]
    full = torch.zeros(len(index), dtype=torch.float32, device=device)
    present = [0.0] * len(index)
    if pos:
        dst = torch.tensor([d for d, _ in pos], device=device)
        src = torch.tensor([s for _, s in pos], device=device)
        full = full.index_copy(0, dst, values.float()[src])
        for d, _ in pos:
            present[d] = 1.0
    pack.put(Key("param", "", field_name), combine, full)
    pack.put(Key("param", "", flag), SUM, torch.tensor(present, dtype=torch.float32, device=device))


def _put_losses(
    pack: Pack, step: int, losses: list[tuple[int, torch.Tensor | float]], window: int, *, distributed: bool
) -> list[int]:
    """Loss values in a fixed layout: one (value, count) slot per step of the window ending at ``step``,
    so that every rank packs the same shape, and a mean across ranks is sum / count."""
    # distributed: the same slots on every rank, whether or not it was given a loss for each step
    steps = list(range(step - window, step + 1)) if distributed else sorted({s for s, _ in losses})
    if not steps:
        return []
    index = {s: i for i, s in enumerate(steps)}
    first_tensor = next((v.device for _, v in losses if isinstance(v, torch.Tensor)), torch.device("cpu"))
    device = pack.device() or first_tensor  # the losses' own device: no transfer per loss
    values: list[tuple[int, torch.Tensor]] = []
    counts = [0.0] * len(steps)
    host_vals = [0.0] * len(steps)
    for s, v in losses:
        i = index.get(s)
        if i is None:
            continue  # outside a distributed run's fixed window (a very late scope.step(loss))
        counts[i] += 1.0
        if isinstance(v, torch.Tensor):
            values.append((i, v.detach().float().reshape(())))
        else:
            host_vals[i] += float(v)
    vec = torch.tensor(host_vals, dtype=torch.float32, device=device)
    for i, t in values:
        vec[i] += t.to(device)  # device-side adds: no transfer until the pack moves
    pack.put(Key("loss", "", "values"), SUM, vec)
    pack.put(Key("loss", "", "counts"), SUM, torch.tensor(counts, dtype=torch.float32, device=device))
    return steps


def losses_to_host(losses: list[tuple[int, torch.Tensor | float]]) -> list[tuple[int, float]]:
    """Pending (step, loss) pairs as host numbers, in one transfer (report time): the mean per step."""
    pack = Pack()
    steps = _put_losses(pack, 0, losses, 0, distributed=False)
    return _losses_from(pack.transfer(None), steps)


def _losses_from(values: Values, steps: list[int]) -> list[tuple[int, float]]:
    if not steps:
        return []
    sums, counts = values.get(Key("loss", "", "values")), values.get(Key("loss", "", "counts"))
    if sums is None or counts is None:
        return []
    return [(s, float(v) / float(c)) for s, v, c in zip(steps, sums, counts, strict=True) if c > 0]


def _absmax(hi: float, neg_lo: float) -> float:
    return max(abs(hi), abs(neg_lo))


def _split_nonfinite(count: int, hi: float, neg_lo: float) -> tuple[int, int]:
    """(NaN, Inf) counts from the non-finite count. min/max propagate NaN, so finite-or-infinite extremes
    mean every non-finite value is an Inf; NaN extremes mean NaN is present (counted as NaN, Inf or not)."""
    if count == 0:
        return 0, 0
    if math.isnan(hi) or math.isnan(neg_lo):
        return count, 0
    return 0, count


def _per_width(values: Values, kind: str, layer: str, prefix: str) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for f in values.fields(kind, layer):
        if f.startswith(prefix + "/"):
            v = values.get(Key(kind, layer, f))
            if v is not None:
                out[int(f.split("/", 1)[1])] = v.copy()
    return out


def _activation(values: Values, name: str, acc: _Acc | None) -> ActivationStats | None:
    s = values.named(Key("act", name, "sums"))
    m = values.named(Key("act", name, "maxes"))
    if not s or not m:
        return None  # only extra fields (add_field) for a layer whose outputs were not measured
    numel, calls = _counts(values, "act", name, acc)
    n = max(numel, 1)
    mean = s["sum"] / n
    ms = s["sumsq"] / n
    nan, inf = _split_nonfinite(int(s["nonfinite"]), m["max"], m["neg_min"])
    alive = {w: v > 0 for w, v in _per_width(values, "act", name, "alive").items()}
    tops = _per_width(values, "act", name, "unit_max")
    sample = values.get(Key("act", name, "sample"))
    stats = ActivationStats(
        numel=numel,
        mean=mean,
        std=math.sqrt(max(ms - mean * mean, 0.0)) if math.isfinite(ms) else ms,
        rms=_sqrt(ms),
        absmax=_absmax(m["max"], m["neg_min"]),
        zero_frac=(numel - s["nonzero"]) / n,
        neg_frac=s.get("neg", 0.0) / n,
        nan=nan,
        inf=inf,
        saturated_frac=s["saturated"] / n if "saturated" in s else None,
        calls=calls,
        alive=next(iter(alive.values())) if len(alive) == 1 else None,
        alive_by_width=alive if len(alive) > 1 else None,
        unit_max=next(iter(tops.values())) if len(tops) == 1 else None,
        sample=None if sample is None else sample.copy(),
    )
    _copy_fields(values, "act", name, stats)
    return stats


def _gradient(values: Values, name: str, acc: _Acc | None, scale: float) -> GradStats | None:
    s = values.named(Key("grad", name, "sums"))
    m = values.named(Key("grad", name, "maxes"))
    if not s or not m:
        return None
    order_v = values.get(Key("grad", name, "order"))
    order = -int(order_v[0]) if order_v is not None else (acc.order if acc is not None else 0)
    nan, inf = _split_nonfinite(int(s["nonfinite"]), m["max"], m["neg_min"])
    units = _per_width(values, "grad", name, "unit_absmax")
    sample = values.get(Key("grad", name, "sample"))
    # gradients of outputs carry the loss scale of mixed-precision training: report them unscaled
    stats = GradStats(
        norm=_sqrt(s["sumsq"]) / scale,
        absmax=_absmax(m["max"], m["neg_min"]) / scale,
        nan=nan,
        inf=inf,
        order=order,
        unit_absmax=next(iter(units.values())) / scale if len(units) == 1 else None,
        sample=None if sample is None else sample / scale,
    )
    _copy_fields(values, "grad", name, stats)
    return stats


def _norm(values: Values, kind: str, name: str, acc: _Acc | None, training: bool) -> NormStats | None:
    s = values.named(Key(kind, name, "sums"))
    if not s:
        return None
    m = values.named(Key(kind, name, "maxes"))
    numel, calls = _counts(values, kind, name, acc)
    n = max(numel, 1)
    stats = NormStats(training=training, input_rms=math.sqrt(max(s["sumsq"] / n, 0.0)), calls=calls)
    if "gap_mean" in s:
        stats.mean_gap_mean = s["gap_mean"] / calls
        stats.log_var_ratio_mean = s["lvr_mean"] / calls
        stats.mean_gap_max, stats.log_var_ratio_max = m["gap_max"], m["lvr_max"]
    if "neg_rv_min" in m:
        stats.running_var_min = -m["neg_rv_min"]
    pooled = values.get(Key(kind, name, "pool_n"))
    if pooled is not None:
        _pooled_gaps(values, kind, name, float(pooled[0]), stats)
    stats.weight_rms = m.get("weight_rms")
    stats.bias_rms = m.get("bias_rms")
    if "weight_absmax" in m:
        stats.weight_absmin, stats.weight_absmax = -m["neg_weight_absmin"], m["weight_absmax"]
    _copy_fields(values, kind, name, stats)
    return stats


def _pooled_gaps(values: Values, kind: str, name: str, n: float, stats: NormStats) -> None:
    """Evaluation inputs pooled over calls against the running statistics, per channel, worst and mean."""
    d = values.get(Key(kind, name, "pool_d"))
    q = values.get(Key(kind, name, "pool_q"))
    rv = values.get(Key(kind, name, "pool_rv"))
    eps_v = values.get(Key(kind, name, "pool_eps"))
    if d is None or q is None or rv is None or eps_v is None or n <= 0:
        return
    eps = float(eps_v[0])
    d64, q64, rv64 = d.astype(np.float64) / n, q.astype(np.float64) / n, rv.astype(np.float64)
    gap = np.abs(d64) / np.sqrt(rv64 + eps)
    stats.mean_gap_max, stats.mean_gap_mean = float(gap.max()), float(gap.mean())
    if n >= 2:  # one value per channel has no variance to compare
        var = np.maximum(q64 - d64 * d64, 0.0)
        lvr = np.abs(np.log((var + eps) / (rv64 + eps)))
        stats.log_var_ratio_max, stats.log_var_ratio_mean = float(lvr.max()), float(lvr.mean())


def _copy_fields(values: Values, kind: str, name: str, target: Any) -> None:
    """Fields added with add_field/add_param_field, onto the record field of the same name."""
    declared = {f.name: f for f in dataclasses.fields(target)}
    for f in values.fields(kind, name):
        if f in _BUILT or "/" in f or f not in declared:
            continue
        v = values.get(Key(kind, name, f))
        if v is None:
            continue
        if v.size == 1:
            is_int = str(declared[f].type).replace(" ", "").startswith("int")
            setattr(target, f, int(v[0]) if is_int and math.isfinite(float(v[0])) else float(v[0]))
        else:
            setattr(target, f, v.copy())


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else x  # NaN/Inf pass through


def _params(record: StepRecord, p: ParamBatch, values: Values, param_lr: dict[str, float]) -> None:
    def col(f: str) -> list[float] | None:
        v = values.get(Key("param", "", f))
        return None if v is None else v.tolist()

    wsq, gsq, has = col("weight_sq"), col("grad_sq"), col("has_grad")
    usq, upd = col("update_sq"), col("updated")
    arms, has_a = col("adam_rms"), col("has_adam")
    for i, name in enumerate(p.names):
        g = gsq[i] if gsq is not None and has is not None and has[i] > 0 else None
        w = wsq[i] if wsq is not None else float("nan")
        stats = record.params[name] = ParamStats(
            grad_norm=None if g is None else _sqrt(g),
            weight_norm=_sqrt(w),
            grad_nonfinite=g is not None and not math.isfinite(g),
            weight_nonfinite=not math.isfinite(w),
            lr=param_lr.get(name),
            frozen=bool(p.frozen[i]) if i < len(p.frozen) else False,
        )
        if usq is not None and upd is not None and upd[i] > 0:
            stats.update_norm = _sqrt(usq[i])
        if arms is not None and has_a is not None and has_a[i] > 0:
            stats.adam_step_rms = arms[i]
