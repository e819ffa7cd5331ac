"""How much the user's gradient clipping changed the gradients, over the collected steps kept.

``StepRecord.clip_ratio`` is the global gradient norm as backward produced it divided by the norm the
optimizer received (hooks/param_grads.py). Clipping that is active on most steps is evidence in itself:
the gradients are routinely larger than the user thought, and the clip, not the learning rate, sets the
step size.
"""

from __future__ import annotations

from statistics import median

from .history import History

#: A ratio above this counts as the clip having acted (not float noise between two reads of one gradient).
ACTIVE = 1.0 + 1e-4


def clip_summary(history: History) -> dict[str, float | int]:
    """``{}`` when no step was clipped; else the share of collected steps clipped and the ratios."""
    ratios = [r.clip_ratio for r in history.records if r.clip_ratio is not None]
    clipped = [x for x in ratios if x > ACTIVE]
    if not clipped:
        return {}
    return {
        "clipped_steps": len(clipped),
        "measured_steps": len(ratios),
        "clipped_share": len(clipped) / len(ratios),
        "median_ratio": median(clipped),
        "max_ratio": max(clipped),
    }
