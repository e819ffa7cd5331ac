"""Reading numbers back: gradscope.json stores NaN/Inf as strings, and any value may be missing."""

from __future__ import annotations

from typing import Any


def as_float(value: Any) -> float | None:
    """A float from a number or a "nan"/"inf" string; None for anything else (absent, None, text)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
