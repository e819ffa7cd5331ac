"""The bounded history store: a ring of recent StepRecords plus streaming summaries of the whole run.

Memory does not grow with training length: the ring keeps the last ``capacity`` collected steps; what
must survive beyond it (the first collected step, the first non-finite event, which parameters ever got
a gradient, the loss curve at reduced resolution) is kept as small summaries.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import DEFAULT_HISTORY
from .birth import NonfiniteEvent
from .birth import first_nonfinite as _first_nonfinite
from .records import LayerInfo, ParamInfo, StepRecord
from .sentinel import SentinelLog

#: Losses kept from the start of a run (see ``History.loss_start``).
LOSS_START_KEPT = 64
#: Points of the whole-run curves (loss, learning rates) kept at reduced resolution.
CURVE_POINTS = 512
#: Non-finite points a thinning of a curve always keeps.
KEPT_BREAKS = 16


@dataclass
class Downsampled:
    """A whole-run curve in bounded memory: at most ``limit`` points, evenly spaced in steps.

    When full, every other point is dropped and the spacing doubles, so the curve always spans the
    run from its first step at a resolution of ``limit / 2`` points or better. A non-finite value is
    always kept (once, where it first follows a finite one): the moment a run broke must show.
    """

    limit: int = CURVE_POINTS
    stride: int = 1
    points: list[tuple[int, float]] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        value = float(value)
        if self.points and step <= self.points[-1][0]:
            if step == self.points[-1][0]:
                self.points[-1] = (step, value)  # the same step again: the latest value wins
            return
        breaks = not _finite(value) and (not self.points or _finite(self.points[-1][1]))
        if self.points and step - self.points[-1][0] < self.stride and not breaks:
            return
        self.points.append((step, value))
        if len(self.points) > self.limit:
            kept = self.points[::2]  # the first point stays: where the run began
            # Never thin away the point where a run broke (a bounded number of them: memory stays bounded).
            breaks = [b for a, b in zip(self.points[::2], self.points[1::2], strict=False) if _finite(a[1]) and not _finite(b[1])]
            kept += breaks[:KEPT_BREAKS]
            self.points = sorted(kept, key=lambda p: p[0])
            self.stride *= 2


@dataclass
class History:
    """What analyzers read. Build it by hand in tests: ``History(layers=..., params=...)`` + ``add()``."""

    layers: dict[str, LayerInfo] = field(default_factory=dict)
    params: dict[str, ParamInfo] = field(default_factory=dict)
    capacity: int = DEFAULT_HISTORY
    has_optimizer: bool = False
    optimizer_types: list[str] = field(default_factory=list)  # class names of watched optimizers
    steps_seen: int = 0  # training steps completed (collected or not)
    records: deque[StepRecord] = field(init=False)
    first: StepRecord | None = field(default=None, init=False)
    first_nonfinite: NonfiniteEvent | None = field(default=None, init=False)
    # The first non-finite value a collected step saw in a module or parameter (stats/birth.py): where
    # it was born, even when first_nonfinite is the loss of an earlier, uncollected step.
    first_located: NonfiniteEvent | None = field(default=None, init=False)
    ever_grad: set[str] = field(default_factory=set, init=False)  # params that ever received a gradient
    ever_frozen: set[str] = field(default_factory=set, init=False)  # params frozen (requires_grad off) on some step
    losses: deque[tuple[int, float]] = field(init=False)  # (step, loss) of every step that gave one
    # The run's first losses, never dropped from the ring: where training began is the baseline that
    # divergence and the report's "loss first -> last" are measured from.
    loss_start: list[tuple[int, float]] = field(default_factory=list, init=False)
    loss_curve: Downsampled = field(default_factory=Downsampled, init=False)  # the whole run, thinned
    loss_min: float | None = field(default=None, init=False)  # the lowest finite loss of the run
    lr_curves: list[Downsampled] = field(default_factory=list, init=False)  # per param group, whole run
    skipped_steps: list[int] = field(default_factory=list, init=False)  # bounded: last `capacity`
    skipped_total: int = field(default=0, init=False)
    # Per-step sentinels (every step, collected or not): first non-finite steps, gradient norms, bursts.
    sentinel: SentinelLog = field(default_factory=SentinelLog, init=False)
    # Layers (or "" for the model as a whole) whose statistics gradscope stopped measuring after an error
    # in its own hooks, and why: the report says what it could not see rather than staying silent.
    unmeasured: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.records = deque(maxlen=self.capacity)
        self.losses = deque(maxlen=4 * self.capacity)

    def add(self, record: StepRecord) -> None:
        """Append one collected step and update the run-long summaries."""
        if self.first is None:
            self.first = record
        self.records.append(record)
        self.steps_seen = max(self.steps_seen, record.step + 1)
        for name, p in record.params.items():
            if p.grad_norm is not None:
                self.ever_grad.add(name)
            if p.frozen:
                self.ever_frozen.add(name)
        if record.loss is not None:
            self.add_loss(record.step, record.loss)
        for g, lr in enumerate(record.lrs):
            if g >= len(self.lr_curves):
                self.lr_curves.append(Downsampled())
            self.lr_curves[g].add(record.step, lr)
        if record.skipped:
            self.add_skipped(record.step)
        if self.first_nonfinite is None or self.first_located is None:
            event = _first_nonfinite(self, record)
            if self.first_nonfinite is None:
                self.first_nonfinite = event
            if self.first_located is None and event is not None and event.source != "loss":
                self.first_located = event

    def add_loss(self, step: int, loss: float) -> None:
        if len(self.loss_start) < LOSS_START_KEPT and (not self.loss_start or self.loss_start[-1][0] < step):
            self.loss_start.append((step, float(loss)))
        if not self.losses or self.losses[-1][0] != step:
            self.losses.append((step, float(loss)))
        else:
            self.losses[-1] = (step, float(loss))
        self.loss_curve.add(step, loss)
        if _finite(loss) and (self.loss_min is None or loss < self.loss_min):
            self.loss_min = float(loss)
        if self.first_nonfinite is None and not _finite(loss):
            self.first_nonfinite = NonfiniteEvent(step=step, layer="", source="loss", tensor="loss")

    def add_skipped(self, step: int) -> None:
        if not self.skipped_steps or self.skipped_steps[-1] != step:
            self.skipped_steps.append(step)
            self.skipped_steps[:] = self.skipped_steps[-self.capacity :]
            self.skipped_total += 1

    def layer_order(self) -> dict[str, int]:
        """Forward execution order; layers never seen running go last, in registration order."""
        seen = sorted((info.order, i, name) for i, (name, info) in enumerate(self.layers.items()))
        ran = [(o, i, n) for o, i, n in seen if o >= 0]
        rest = [(o, i, n) for o, i, n in seen if o < 0]
        return {n: k for k, (_, _, n) in enumerate(ran + sorted(rest, key=lambda t: t[1]))}

    @property
    def last(self) -> StepRecord | None:
        return self.records[-1] if self.records else None


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))
