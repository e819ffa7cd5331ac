"""parameters analyzer (to be written)."""

from __future__ import annotations

from ..config import Thresholds
from ..findings import Finding
from ..stats.history import History


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    return []
