"""Per-step sentinels: the loss and the global gradient norm of EVERY step, read without a host-device sync.

Collected steps are sampled; these two numbers are not. They date the first non-finite loss or gradient
exactly and feed the schedule's bursts (gradscope/schedule.py). Each costs one small reduction on the
device per step and nothing else:

- on the CPU a tensor's value is read directly (there is no device to wait for);
- on a CUDA device the scalar is copied asynchronously into a slot of a pinned host buffer and an event
  is recorded after the copy; :meth:`Sentinel.poll` reads only the slots whose event has completed
  (``Event.query()`` never blocks), so a value arrives a step or so late, and never costs a sync;
- on other devices (MPS, XPU ...) the sentinel is off: no portable non-blocking read exists there.

If the pinned ring is full (the device is far behind the host) a value is dropped, never waited for.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed import local

#: Slots of the pinned ring per device: values in flight at once before new ones are dropped.
RING = 64

#: Per-step gradient norms kept for reporters and analyzers (bounded: memory does not grow with the run).
KEPT = 1024

#: On the CPU the gradient norm is a real pass over every gradient (0.1-0.5 ms on the bench models, up to 3 %
#: of a small model's step): it runs on every k-th step, k chosen so that it costs at most this share of the
#: measured step time. On an accelerator it is one asynchronous kernel, run every step.
CPU_SHARE = 0.005

#: The most steps the CPU gradient norm may skip between two readings.
CPU_MAX_EVERY = 16


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The global L2 norm of the gradients that exist, on their device: one fused ``_foreach_norm`` and
    one norm of the norms, no host sync. NaN/Inf if any gradient held one. None without gradients."""
    grads: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None or g.is_sparse:
            continue
        grads.append(local(g.detach()))
    if not grads:
        return None
    # fused per device and dtype on accelerators; fp32 results so that fp16 norms cannot overflow
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))  # () fp32


class _Ring:
    """A pinned host buffer and the copies in flight into it, for one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host = torch.zeros(RING, dtype=torch.float32, pin_memory=True)
        self.free = deque(range(RING))
        self.pending: deque[tuple[int, str, int, Any]] = deque()  # (step, name, slot, event)

    def push(self, step: int, name: str, value: torch.Tensor) -> bool:
        if not self.free:
            return False  # the device is far behind: drop rather than wait
        slot = self.free.popleft()
        with torch.cuda.device(self.device):
            self.host[slot : slot + 1].copy_(value.detach().reshape(1).float(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending.append((step, name, slot, event))
        return True

    def poll(self) -> list[tuple[int, str, float]]:
        out: list[tuple[int, str, float]] = []
        while self.pending and self.pending[0][3].query():  # in stream order: stop at the first in flight
            step, name, slot, _ = self.pending.popleft()
            out.append((step, name, float(self.host[slot])))
            self.free.append(slot)
        return out


class Landing:
    """A small device vector on its way to the host, started before the collected step's own transfer.

    On a CUDA device the copy is queued asynchronously (into pinned memory) with an event after it, so the
    step's one synchronising transfer (the engine's) also lands it; :meth:`values` waits on the event,
    which by then has nearly always completed. On the CPU the values are read directly."""

    def __init__(self, t: torch.Tensor) -> None:
        self.event: Any = None
        if t.device.type == "cuda":
            self.host = t.detach().to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t.detach().cpu()

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()  # a collected step: it syncs once anyway
        return self.host.tolist()


@dataclass
class SentinelLog:
    """What the sentinels saw over the whole run, in bounded memory (kept in History.sentinel)."""

    #: First step at which each signal ("loss", "grad_norm") was non-finite.
    first_nonfinite: dict[str, int] = field(default_factory=dict)
    #: The step after the last finite reading before it: the first non-finite value appeared in
    #: [not_before, first_nonfinite] (the same step when the signal was read on every step).
    not_before: dict[str, int] = field(default_factory=dict)
    _last_finite: dict[str, int] = field(default_factory=dict, repr=False)
    #: (step, global gradient norm as the optimizer received it) of the last KEPT steps that had one.
    grad_norms: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=KEPT))
    #: (first step, why) of each burst of dense collection (the first 64 of the run).
    bursts: list[tuple[int, str]] = field(default_factory=list)

    def add(self, step: int, name: str, value: float) -> None:
        if math.isfinite(value):
            self._last_finite[name] = step
        elif name not in self.first_nonfinite or step < self.first_nonfinite[name]:
            self.first_nonfinite[name] = step
            last = self._last_finite.get(name, -1)
            self.not_before[name] = last + 1 if last < step else step
        if name == "grad_norm":
            self.grad_norms.append((step, value))


@dataclass
class _Cadence:
    """Every how many steps the CPU gradient norm runs, from its measured cost and the step time."""

    every: int = 1
    cost: float = 0.0  # seconds per reading (moving average)
    step_time: float = 0.0  # seconds between two calls, i.e. one training step (moving average)
    _last_call: float | None = None

    def due(self, step: int) -> bool:
        now = time.perf_counter()
        if self._last_call is not None:
            dt = now - self._last_call
            self.step_time = dt if self.step_time == 0 else 0.9 * self.step_time + 0.1 * dt
        self._last_call = now
        return step % self.every == 0

    def spent(self, seconds: float) -> None:
        self.cost = seconds if self.cost == 0 else 0.9 * self.cost + 0.1 * seconds
        if self.step_time > 0:
            self.every = max(1, min(CPU_MAX_EVERY, math.ceil(self.cost / (CPU_SHARE * self.step_time))))


class Sentinel:
    """Collects per-step scalars on their device and hands them back as host numbers when they are ready."""

    def __init__(self) -> None:
        self._rings: dict[torch.device, _Ring] = {}
        self._ready: list[tuple[int, str, float]] = []
        self.enabled = True
        self._cadence: dict[str, _Cadence] = {}

    def push(self, step: int, name: str, value: torch.Tensor | float) -> None:
        """Take the value of signal ``name`` at ``step``; never blocks, never raises into training."""
        if not self.enabled:
            return
        if not isinstance(value, torch.Tensor):
            self._ready.append((step, name, float(value)))
            return
        if value.numel() != 1 or not (value.is_floating_point() or value.is_complex()):
            return
        device = value.device
        if device.type == "cpu":
            self._ready.append((step, name, float(value.detach().reshape(()).real.float())))
        elif device.type == "cuda":
            ring = self._rings.get(device)
            if ring is None:
                ring = self._rings[device] = _Ring(device)
            ring.push(step, name, value.real if value.is_complex() else value)
        # other devices: no way to read without a sync, so no sentinel there

    def push_grad_norm(
        self, step: int, params: list[torch.Tensor], name: str = "grad_norm", probe: list[torch.Tensor] | None = None
    ) -> None:
        """The global gradient norm of ``params`` at ``step`` (reduced on the device). On the CPU steps where
        the full norm is skipped for cost, the norm of ``probe`` (a small tensor that backward reaches last)
        is read instead, as signal ``name + ":probe"``, so that a NaN born in backward is still dated."""
        if not self.enabled:
            return
        cadence = self._cadence.get(name)
        if cadence is None:
            cadence = self._cadence[name] = _Cadence()
        if not cadence.due(step):
            small = grad_norm(probe) if probe else None
            if small is not None and small.device.type == "cpu":
                self.push(step, name + ":probe", small)
            return
        start = time.perf_counter()
        norm = grad_norm(params)
        if norm is None or norm.device.type not in ("cpu", "cuda"):
            return
        self.push(step, name, norm)
        if norm.device.type == "cpu":  # synchronous there: the wall time is the cost
            cadence.spent(time.perf_counter() - start)

    def poll(self) -> list[tuple[int, str, float]]:
        """Every value whose copy has landed, oldest first per device; never waits."""
        out, self._ready = self._ready, []
        for ring in self._rings.values():
            out.extend(ring.poll())
        return out
