"""Which training steps are collected: a plain function of the step and of what was observed so far.

Trouble starts early (a learning rate too high, a bad initialisation) or suddenly (a spike, a NaN). The
default schedule therefore collects every step of the run's start, then samples, and switches to dense
collection for a while (a *burst*) when a per-step signal leaves its recent range or stops being finite,
so that the step after an anomaly is seen in full. See docs/schedule.md for the numbers and their cost.

- :class:`Schedule` answers "is step *s* collected?" from the step and an :class:`Observed` state.
- :class:`Observer` turns the per-step signals (the loss, the global gradient norm of the sentinel) into
  that state: it decides when a burst starts, and keeps the bursts within a budget.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .errors import UsageError

#: Steps collected in full at the start of a run by the default schedule. A collected step costs about
#: 1.2-1.4x a plain one on the CPU (benchmarks/README.md); 16 of them add at most ~6 step-equivalents,
#: 0.6 % of a 1,000-step run, and cover the first steps where a learning rate too high does its damage
#: (nanoGPT at 100x: update ratios above 0.1 for steps 0-7, the loss peaking at step 7).
DENSE_START = 16

#: Steps collected in full after an anomaly (the step that showed it is over when it is seen).
BURST = 8


@dataclass(frozen=True)
class Observed:
    """What the schedule may look at besides the step index: the end of the burst in progress."""

    burst_until: int = -1  # every step before this one is collected (-1: no burst)


@dataclass(frozen=True)
class Schedule:
    """Collect every step before ``start``, every ``dense``-th step before ``until``, then every
    ``sparse``-th; and every step of a burst when ``burst`` > 0.

    ``watch(every=N)`` is ``Schedule(N, 0, N)``: exactly every N-th step, with no dense start and no
    bursts, so that a user who chose N gets N. The default, ``Schedule()``, adds the dense start of
    :data:`DENSE_START` steps and bursts of :data:`BURST` steps to the sampling of every 10th step until
    step 200, then every 50th.
    """

    dense: int = 10
    until: int = 200
    sparse: int = 50
    start: int = 0
    burst: int = 0

    def __call__(self, step: int, observed: Observed | None = None) -> bool:
        if step < self.start:
            return True
        if self.burst > 0 and observed is not None and step < observed.burst_until:
            return True
        return step % (self.dense if step < self.until else self.sparse) == 0

    @property
    def adaptive(self) -> bool:
        """Whether what was observed can add steps (bursts)."""
        return self.burst > 0

    def describe(self) -> str:
        if self.until <= 0 or self.dense == self.sparse:
            base = f"every {self.sparse} steps"
        else:
            base = f"every {self.dense} steps until step {self.until}, then every {self.sparse}"
        extra = []
        if self.start > 0:
            extra.append(f"every step before step {self.start}")
        if self.burst > 0:
            extra.append(f"{self.burst} steps after an anomaly")
        return base + (" (and " + ", ".join(extra) + ")" if extra else "")


#: ``watch()``'s default schedule.
DEFAULT_SCHEDULE = Schedule(dense=10, until=200, sparse=50, start=DENSE_START, burst=BURST)


def schedule_for(every: int | Schedule | None) -> Schedule:
    """The schedule ``watch(every=...)`` means; a clear UsageError for anything else."""
    if every is None:
        return DEFAULT_SCHEDULE
    if isinstance(every, Schedule):
        return every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UsageError(f"every must be an int >= 1 (collect every N-th step) or None, got {every!r}")
    return Schedule(dense=every, until=0, sparse=every)


@dataclass
class _Series:
    """The recent finite values of one per-step signal."""

    window: deque[float]
    last_finite: bool = True


@dataclass
class Observer:
    """Decides bursts from per-step signals; its :attr:`state` is what :class:`Schedule` reads.

    A value is an anomaly when it is non-finite while the previous value of its series was finite, or
    when it rises above the highest of the last ``window`` finite values by more than their spread
    (highest - lowest) and by more than ``margin`` of that highest value. Falling values never are: a
    loss that drops is what training is for. Only upward departures are judged, once ``min_values``
    values are known (the dense start covers the first steps anyway).

    Bursts are budgeted so that a noisy run cannot turn the default schedule into every=1: at most
    ``budget_base`` + ``budget_share`` x steps-so-far burst steps in total.
    """

    burst: int = BURST
    window: int = 16
    min_values: int = 8
    margin: float = 0.25
    budget_base: int = 4 * BURST
    budget_share: float = 0.01
    state: Observed = field(default_factory=Observed)
    bursts: list[tuple[int, str]] = field(default_factory=list)  # (first step of the burst, why)
    burst_steps: int = 0  # steps added by bursts so far
    _series: dict[str, _Series] = field(default_factory=dict)

    def observe(self, step: int, name: str, value: float) -> bool:
        """Take the value of signal ``name`` at ``step`` (steps arrive in order per signal). Returns
        True when it started or extended a burst covering the steps after ``step``."""
        series = self._series.get(name)
        if series is None:
            series = self._series[name] = _Series(window=deque(maxlen=self.window))
        why = self._anomaly(series, value)
        if math.isfinite(value):
            series.window.append(value)
            series.last_finite = True
        else:
            series.last_finite = False
        if why is None or self.burst <= 0:
            return False
        return self._start(step, f"{name} {why} at step {step}")

    def _anomaly(self, series: _Series, value: float) -> str | None:
        if not math.isfinite(value):
            return "became non-finite" if series.last_finite else None
        if len(series.window) < self.min_values:
            return None
        hi, lo = max(series.window), min(series.window)
        if value > hi + max(hi - lo, self.margin * abs(hi)):
            return f"left its recent range ({value:.4g} above {lo:.4g}..{hi:.4g})"
        return None

    def _start(self, step: int, why: str) -> bool:
        first = max(step + 1, self.state.burst_until)
        until = step + 1 + self.burst
        added = until - first
        if added <= 0:
            return False
        budget = self.budget_base + int(self.budget_share * step) - self.burst_steps
        if budget <= 0:
            return False
        added = min(added, budget)
        self.burst_steps += added
        self.state = Observed(burst_until=first + added)
        if (first == step + 1 or not self.bursts) and len(self.bursts) < 64:
            self.bursts.append((step + 1, why))  # bounded: the first bursts of a run matter most
        return True


def departures(points: list[tuple[int, float]], observer: Observer | None = None) -> list[int]:
    """Steps at which a per-step series (e.g. the losses of ``History.loss_start`` + ``History.losses``)
    left its recent range or stopped being finite, by the same rule as :class:`Observer` (no budget).

    For dating: a blow-up began at the last departure at or before the step a rule noticed it."""
    ref = observer or Observer()
    out: list[int] = []
    series = _Series(window=deque(maxlen=ref.window))
    for step, value in points:
        if ref._anomaly(series, value) is not None:
            out.append(step)
        if math.isfinite(value):
            series.window.append(value)
            series.last_finite = True
        else:
            series.last_finite = False
    return out
