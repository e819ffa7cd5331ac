"""The loss curve, read one way by every rule.

Every gate that asks "is the loss improving?", "is it stuck?", "did it diverge?" reads it here, so two
rules never disagree about the same curve. The baseline is where the run *started* (the run's first
losses, which History keeps beyond its ring), never a median that already contains a blow-up at step 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

from ..config import Thresholds
from ..stats.history import History

Points = list[tuple[int, float]]


def loss_points(history: History) -> Points:
    """Every loss kept, in step order: the run's first losses, then the ring (one value per step)."""
    ring = list(history.losses)
    first_ring = ring[0][0] if ring else None
    head = [p for p in history.loss_start if first_ring is None or p[0] < first_ring]
    return head + ring


def roughness(points: Points) -> float:
    """Step-to-step noise of the loss: median |v[t] - v[t-1]| over the median |v| (0 for a smooth curve).

    A small-batch regression loss can jump +/-90 % from one batch to the next; a cross-entropy loss at
    initialization barely moves between batches (every sample's loss is near ln(C)).
    """
    vals = [v for _, v in points if math.isfinite(v)]
    if len(vals) < 3:
        return 0.0
    diffs = sorted(abs(b - a) for a, b in pairwise(vals))
    mid = sorted(abs(v) for v in vals)[len(vals) // 2]
    return diffs[len(diffs) // 2] / mid if mid > 0 else 0.0


#: Above this roughness one loss is no baseline: take the median of the first three.
NOISY = 0.25


def start_level(points: Points) -> float | None:
    """Where training began: the first loss, or the median of the first three if that is lower.

    At initialization every sample's loss is alike, so the first loss is representative; taking the lower
    of it and the median of the first three keeps a loss that blew up on the very first update (lr 100x:
    4.4 at step 0, 42 at step 1) from becoming its own baseline. When the loss is so noisy from step to step
    (``roughness`` above ``NOISY``) that one draw says little, the median of the first three is the start.
    """
    vals = [v for _, v in points[:3] if math.isfinite(v)]
    if not vals:
        return None
    med = sorted(vals)[len(vals) // 2]
    return med if roughness(points) > NOISY else min(vals[0], med)


def change(points: Points, min_points: int = 6) -> float | None:
    """Relative improvement from the first to the last third of ``points`` (positive = improving).

    None with fewer than ``min_points`` losses (can't tell); ``-inf`` when a loss went non-finite.
    """
    if len(points) < min_points:
        return None
    vals = [v for _, v in points]
    if not all(math.isfinite(v) for v in vals):
        return -math.inf
    k = len(vals) // 3
    early, late = sum(vals[:k]) / k, sum(vals[-k:]) / k
    return (early - late) / max(abs(early), 1e-12)


@dataclass(frozen=True)
class LossTrend:
    """What the loss did over a span of steps, for the symptom gates of every rule."""

    change: float | None  # relative improvement first third -> last third; None: too few losses
    plateau: float  # Thresholds.loss_plateau
    points: int

    @property
    def known(self) -> bool:
        return self.change is not None

    @property
    def improving(self) -> bool:
        return self.change is not None and self.change >= self.plateau

    @property
    def stuck(self) -> bool | None:
        """Not improving (or gone non-finite); None when it cannot be told."""
        return None if self.change is None else self.change < self.plateau

    @property
    def converged(self) -> bool:
        """Fell by two orders of magnitude or more: small gradients are convergence, not a fault."""
        return self.change is not None and math.isfinite(self.change) and self.change >= 0.99


def trend(history: History, th: Thresholds, since: int | None = None, until: int | None = None) -> LossTrend:
    """The loss trend over ``[since, until)`` (the whole run by default)."""
    pts = [(s, v) for s, v in loss_points(history) if (since is None or s >= since) and (until is None or s < until)]
    return LossTrend(change(pts), th.loss_plateau, len(pts))


def gate_text(trend_: LossTrend) -> str:
    """How a finding lowered by the loss gate says so."""
    if trend_.change is None:
        return "no loss was given"
    return f"the loss improved by {trend_.change:.0%} over the run"


def level(vals: list[float]) -> float:
    """A window's loss level: its 10 %-trimmed mean. The mean follows a small-batch loss whose values are
    two clouds (right / wrong answers) where a median jumps between them; trimming drops a lone spike."""
    x = sorted(vals)
    k = len(x) // 10
    x = x[k : len(x) - k] if k else x
    return sum(x) / len(x)


def level_rise(history: History, th: Thresholds) -> float | None:
    """The loss level now (last ``loss_window`` losses) over its lowest level in any earlier window.

    None with fewer than two windows of finite, positive losses (a rise factor needs a positive floor).
    """
    w = max(int(th.loss_window), 1)
    vals = [v for _, v in loss_points(history)]
    if len(vals) < 2 * w or not all(math.isfinite(v) and v > 0 for v in vals):
        return None
    now = level(vals[-w:])
    low = min(level(vals[i : i + w]) for i in range(0, len(vals) - w, max(w // 2, 1)))
    return now / low
