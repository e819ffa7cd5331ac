"""Per-step, on-device accumulation of statistics, and the one packed transfer that ends a collected step.

Hooks call ``add_*`` with live tensors; each call reduces to a few numbers that stay on the device. At
the end of a collected step :meth:`StepCollector.flush` concatenates every accumulator into one buffer
laid out as ``[sum-type slots | max-type slots]``, moves it to the host once, and unpacks it into a
:class:`~gradscope.stats.records.StepRecord`. The two halves are what a distributed run combines with a
SUM and a MAX all-reduce respectively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import reductions as R
from .records import ActivationStats, GradStats, NormStats, ParamStats, StepRecord


@dataclass
class _Acc:
    """Running sums and maxes of one (kind, layer) on the device, plus host-side counts."""

    sums: torch.Tensor
    maxes: torch.Tensor
    numel: int = 0
    calls: int = 1
    units: torch.Tensor | None = None  # per-unit absmax (activations of relu-like modules)
    units_ok: bool = True  # False once two calls disagreed on the unit count
    sample: torch.Tensor | None = None
    order: int = 0  # backward firing order (gradients); forward call order is kept by the scope
    meta: dict[str, float] = field(default_factory=dict)

    def add(self, sums: torch.Tensor, maxes: torch.Tensor) -> None:
        self.sums.add_(sums)
        torch.maximum(self.maxes, maxes, out=self.maxes)
        self.calls += 1


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
    adam_rms: list[torch.Tensor] = field(default_factory=list)  # RMS of lr / (sqrt(v_hat) + eps), per Adam step


class StepCollector:
    """Accumulates one step's statistics; ``flush()`` turns them into a host-side StepRecord."""

    def __init__(self) -> None:
        self.acts: dict[str, _Acc] = {}
        self.grads: dict[str, _Acc] = {}
        self.norms: dict[str, _Acc] = {}
        self.eval_norms: dict[str, _Acc] = {}
        self.params: ParamBatch | None = None
        self._grad_order = 0

    def reset(self) -> None:
        self.acts.clear()
        self.grads.clear()
        self.norms.clear()
        self.params = None
        self._grad_order = 0

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
    ) -> None:
        sums, maxes = R.activation_stats(x, band=band, count_neg=count_neg)
        acc = self.acts.get(layer)
        if acc is None:
            acc = self.acts[layer] = _Acc(sums=sums, maxes=maxes, numel=x.numel())
            acc.meta.update(band=float(band is not None), neg=float(count_neg))
            if unit_dim is not None:
                acc.units = R.unit_absmax(x, unit_dim, nonnegative=not count_neg)
            if sample:
                acc.sample = R.strided_sample(x)
            return
        acc.add(sums, maxes)
        acc.numel += x.numel()
        if acc.units is not None and unit_dim is not None:
            units = R.unit_absmax(x, unit_dim, nonnegative=not count_neg)
            if units.shape == acc.units.shape:
                torch.maximum(acc.units, units, out=acc.units)
            else:  # a shared module applied to tensors of different widths: no per-unit view
                acc.units, acc.units_ok = None, False

    def add_norm_input(self, layer: str, module: torch.nn.Module, x: torch.Tensor, *, training: bool) -> None:
        """A normalization layer's input against its running statistics, before this batch updates them."""
        target = self.norms if training else self.eval_norms
        xf = x.detach()
        if xf.dtype != torch.float32:
            xf = xf.float()
        flat = xf.reshape(-1)
        sumsq = torch.dot(flat, flat)
        rm = getattr(module, "running_mean", None)
        rv = getattr(module, "running_var", None)
        eps = float(getattr(module, "eps", 1e-5))
        has_running = isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) and xf.dim() >= 2
        sums_l, maxes_l = [sumsq], []
        if has_running:
            mean, var = R.channel_stats(xf)
            rvf, rmf = rv.detach().float(), rm.detach().float()
            gap = (mean - rmf).abs() / torch.sqrt(rvf + eps)  # (C,)
            lvr = torch.log((var + eps) / (rvf + eps)).abs()  # (C,)
            sums_l += [gap.mean(), lvr.mean()]
            maxes_l += [gap.max(), lvr.max(), -rvf.min()]
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        has_w = isinstance(weight, torch.Tensor)
        has_b = isinstance(bias, torch.Tensor)
        if has_w:
            maxes_l.append(weight.detach().float().square().mean().sqrt())
        if has_b:
            maxes_l.append(bias.detach().float().square().mean().sqrt())
        sums = torch.stack(sums_l)
        maxes = torch.stack(maxes_l) if maxes_l else sums.new_empty(0)
        acc = target.get(layer)
        if acc is None:
            acc = target[layer] = _Acc(sums=sums, maxes=maxes, numel=x.numel())
            acc.meta.update(running=float(has_running), weight=float(has_w), bias=float(has_b))
        else:
            acc.add(sums, maxes)
            acc.numel += x.numel()

    # --- backward ---------------------------------------------------------------------------------
    def add_grad(self, layer: str, g: torch.Tensor, *, sample: bool) -> None:
        sums, maxes = R.grad_stats(g)
        acc = self.grads.get(layer)
        if acc is None:
            acc = self.grads[layer] = _Acc(sums=sums, maxes=maxes, numel=g.numel(), order=self._grad_order)
            self._grad_order += 1
            if sample:
                acc.sample = R.strided_sample(g)
        else:
            acc.add(sums, maxes)
            acc.numel += g.numel()

    def flush_eval(self) -> dict[str, NormStats]:
        """Evaluation-forward norm statistics gathered since the last collected step (report time)."""
        if not self.eval_norms:
            return {}
        pack = _Pack()
        for name, acc in self.eval_norms.items():
            pack.put("eval_norm", name, "local", acc.sums, "sum")
            pack.put("eval_norm", name, "local", acc.maxes, "max")
        views = pack.transfer(None)
        out = {name: _norm(acc, views, "eval_norm", name, False) for name, acc in self.eval_norms.items()}
        self.eval_norms.clear()
        return out

    # --- the packed transfer ----------------------------------------------------------------------
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
    ) -> tuple[StepRecord, list[tuple[int, float]]]:
        """One device-to-host transfer for everything this step gathered; returns the record and losses.

        With a ``combiner`` (a distributed run) the packed buffer is first combined across ranks, so every
        rank unpacks the same numbers. Everything in the "sum" and "max" halves must then have the same
        layout on every rank; per-rank extras (eval forwards, histogram samples) travel in "local".
        """
        pack = _Pack()
        for name, acc in self.acts.items():
            pack.put("act", name, "sum", acc.sums)
            pack.put("act", name, "max", acc.maxes)
            pack.put("act_units", name, "max", acc.units)
            pack.put("act_sample", name, "local", acc.sample)
        for name, acc in self.grads.items():
            pack.put("grad", name, "sum", acc.sums)
            pack.put("grad", name, "max", acc.maxes)
            pack.put("grad_sample", name, "local", acc.sample)
        for name, acc in self.norms.items():
            pack.put("norm", name, "sum", acc.sums)
            pack.put("norm", name, "max", acc.maxes)
        for name, acc in self.eval_norms.items():
            pack.put("eval_norm", name, "local", acc.sums, "sum")
            pack.put("eval_norm", name, "local", acc.maxes, "max")
        p = self.params
        if p is not None:
            # Replicated parameters are identical on every rank (max); shards add up (sum of squares).
            half = "sum" if p.sharded else "max"
            pack.put("param", "grad_sq", half, p.grad_sq)
            pack.put("param", "weight_sq", half, p.weight_sq)
            if p.update_sq:
                pack.put("param", "update_sq", half, torch.cat([u.reshape(-1) for u in p.update_sq]))
            if p.adam_rms:  # a per-rank RMS: the largest across ranks (identical for replicated params)
                pack.put("param", "adam_rms", "max", torch.cat([a.reshape(-1) for a in p.adam_rms]))
        if grad_scale is not None:
            pack.put("scale", "value", "max", grad_scale.detach().float())
        loss_steps = _put_losses(pack, step, losses or [], loss_window, distributed=combiner is not None)
        trained = [*self.acts.values(), *self.grads.values(), *self.norms.values()]
        if combiner is not None:  # element counts and calls add up across ranks too
            counts = [float(a.numel) for a in trained] + [float(a.calls) for a in trained]
            device = pack.device() or torch.device("cpu")
            pack.put("counts", "", "sum", torch.tensor(counts, dtype=torch.float32, device=device))
        views = pack.transfer(combiner)
        if combiner is not None and trained:
            counts = views[("counts", "", "sum")]
            for i, acc in enumerate(trained):
                acc.numel, acc.calls = int(counts[i]), int(counts[len(trained) + i])

        record = StepRecord(step=step, lrs=list(lrs or []))
        for name, acc in self.acts.items():
            record.activations[name] = _activation(acc, views, name)
        scale = float(views[("scale", "value", "max")][0]) if grad_scale is not None else 1.0
        for name, acc in self.grads.items():
            s, m = views[("grad", name, "sum")], views[("grad", name, "max")]
            sample = views.get(("grad_sample", name, "local"))
            nan, inf = _split_nonfinite(int(s[1]), float(m[0]), float(m[1]))
            record.gradients[name] = GradStats(
                # gradients of outputs carry the loss scale of mixed-precision training: report them unscaled
                norm=_sqrt(float(s[0])) / scale,
                absmax=_absmax(float(m[0]), float(m[1])) / scale,
                nan=nan,
                inf=inf,
                order=acc.order,
                sample=None if sample is None else sample / scale,
            )
        for name, acc in self.norms.items():
            record.norms[name] = _norm(acc, views, "norm", name, True)
        for name, acc in self.eval_norms.items():
            record.eval_norms[name] = _norm(acc, views, "eval_norm", name, False)
        if p is not None:
            _params(record, p, views, param_lr or {}, "sum" if p.sharded else "max")
        self.eval_norms.clear()
        return record, _losses_from(views, loss_steps)


class Combiner:
    """Combines a packed buffer across the ranks of a process group with one all_gather."""

    def __init__(self, group: object = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.world = dist.get_world_size(group)

    def combine(self, buf: torch.Tensor, sum_len: int, max_len: int) -> torch.Tensor:
        gathered = [torch.empty_like(buf) for _ in range(self.world)]
        self.dist.all_gather(gathered, buf, group=self.group)
        stacked = torch.stack(gathered)  # (world, len)
        out = buf.clone()  # the "local" tail stays this rank's own
        out[:sum_len] = stacked[:, :sum_len].sum(0)
        out[sum_len : sum_len + max_len] = stacked[:, sum_len : sum_len + max_len].amax(0)
        return out


class _Pack:
    """Collects device tensors into the layout [sum half | max half | local], then moves them at once."""

    HALVES = ("sum", "max", "local")

    def __init__(self) -> None:
        self.pieces: dict[str, list[torch.Tensor]] = {h: [] for h in self.HALVES}
        self.layout: list[tuple[tuple[str, str, str], str, int]] = []

    def put(self, group: str, key: str, half: str, t: torch.Tensor | None, tag: str | None = None) -> None:
        if t is None:
            return
        t = t.reshape(-1)
        self.pieces[half].append(t)
        self.layout.append(((group, key, tag or half), half, t.numel()))

    def device(self) -> torch.device | None:
        for half in self.HALVES:
            if self.pieces[half]:
                return self.pieces[half][0].device
        return None

    def transfer(self, combiner: Combiner | None) -> dict[tuple[str, str, str], np.ndarray]:
        ordered = [t for h in self.HALVES for t in self.pieces[h]]
        lengths = {h: sum(t.numel() for t in self.pieces[h]) for h in self.HALVES}
        if not ordered:
            host = np.zeros(0, dtype=np.float32)
        else:
            device = ordered[0].device
            flat = [
                t if t.device == device and t.dtype == torch.float32 else t.to(device, torch.float32)
                for t in ordered
            ]
            buf = torch.cat(flat)
            if combiner is not None:
                buf = combiner.combine(buf, lengths["sum"], lengths["max"])
            host = buf.cpu().numpy()  # the one transfer (a single sync) of a collected step
        cursor = {"sum": 0, "max": lengths["sum"], "local": lengths["sum"] + lengths["max"]}
        views: dict[tuple[str, str, str], np.ndarray] = {}
        for key, half, size in self.layout:
            start = cursor[half]
            views[key] = host[start : start + size]
            cursor[half] = start + size
        return views


def _put_losses(
    pack: _Pack, step: int, losses: list[tuple[int, torch.Tensor | float]], window: int, *, distributed: bool
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
    pack.put("loss", "values", "sum", vec)
    pack.put("loss", "counts", "sum", torch.tensor(counts, dtype=torch.float32, device=device))
    return steps


def losses_to_host(losses: list[tuple[int, torch.Tensor | float]]) -> list[tuple[int, float]]:
    """Pending (step, loss) pairs as host numbers, in one transfer (report time): the mean per step."""
    pack = _Pack()
    steps = _put_losses(pack, 0, losses, 0, distributed=False)
    return _losses_from(pack.transfer(None), steps)


def _losses_from(views: dict, steps: list[int]) -> list[tuple[int, float]]:
    if not steps:
        return []
    values, counts = views[("loss", "values", "sum")], views[("loss", "counts", "sum")]
    return [(s, float(v) / float(c)) for s, v, c in zip(steps, values, counts, strict=True) if c > 0]


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


def _activation(acc: _Acc, views: dict, name: str) -> ActivationStats:
    slots = R.act_sum_slots(count_neg=bool(acc.meta["neg"]), band=bool(acc.meta["band"]))
    s = dict(zip(slots, views[("act", name, "sum")].tolist(), strict=True))
    m = dict(zip(R.ACT_MAX_SLOTS, views[("act", name, "max")].tolist(), strict=True))
    n = max(acc.numel, 1)
    mean = s["sum"] / n
    ms = s["sumsq"] / n
    units = views.get(("act_units", name, "max"))
    sample = views.get(("act_sample", name, "max"))
    nan, inf = _split_nonfinite(int(s["nonfinite"]), m["max"], m["neg_min"])
    return ActivationStats(
        numel=acc.numel,
        mean=mean,
        std=math.sqrt(max(ms - mean * mean, 0.0)) if math.isfinite(ms) else ms,
        rms=_sqrt(ms),
        absmax=_absmax(m["max"], m["neg_min"]),
        zero_frac=(acc.numel - s["nonzero"]) / n,
        neg_frac=s.get("neg", 0.0) / n,
        nan=nan,
        inf=inf,
        saturated_frac=s["saturated"] / n if "saturated" in s else None,
        calls=acc.calls,
        alive=None if units is None else units > 0,
        sample=None if sample is None else sample.copy(),
    )


def _norm(acc: _Acc, views: dict, group: str, name: str, training: bool) -> NormStats:
    s, m = views[(group, name, "sum")], views[(group, name, "max")]
    n = max(acc.numel, 1)
    stats = NormStats(training=training, input_rms=math.sqrt(max(float(s[0]) / n, 0.0)), calls=acc.calls)
    rest = list(m)
    if acc.meta.get("running"):
        stats.mean_gap_mean = float(s[1]) / acc.calls
        stats.log_var_ratio_mean = float(s[2]) / acc.calls
        stats.mean_gap_max, stats.log_var_ratio_max = float(rest[0]), float(rest[1])
        stats.running_var_min = -float(rest[2])
        rest = rest[3:]
    if acc.meta.get("weight"):
        stats.weight_rms, rest = float(rest[0]), rest[1:]
    if acc.meta.get("bias"):
        stats.bias_rms = float(rest[0])
    return stats


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else x  # NaN/Inf pass through


def _params(record: StepRecord, p: ParamBatch, views: dict, param_lr: dict[str, float], half: str) -> None:
    grads = dict(zip(p.grad_names, views[("param", "grad_sq", half)].tolist(), strict=True))
    wsq = views[("param", "weight_sq", half)].tolist()
    for name, w in zip(p.names, wsq, strict=True):
        g = grads.get(name)
        record.params[name] = ParamStats(
            grad_norm=None if g is None else _sqrt(g),
            weight_norm=_sqrt(w),
            grad_nonfinite=g is not None and not math.isfinite(g),
            weight_nonfinite=not math.isfinite(w),
            lr=param_lr.get(name),
        )
    if p.update_sq:
        usq = views[("param", "update_sq", half)].tolist()
        for name, u in zip(p.update_names, usq, strict=True):
            if name in record.params:
                record.params[name].update_norm = _sqrt(u)
    if p.adam_rms:
        for name, a in zip(p.adam_names, views[("param", "adam_rms", "max")].tolist(), strict=True):
            if name in record.params:
                record.params[name].adam_step_rms = a
