"""gradscope: gradient-flow diagnostics for PyTorch. The public names of ../shared/CONTRACT.md."""

from __future__ import annotations

from .config import Thresholds
from .errors import GradscopeError
from .findings import Finding, Report
from .scope import Scope, watch

__all__ = [
    "Finding",
    "GradscopeError",
    "Report",
    "Scope",
    "Thresholds",
    "inspect_checkpoint",
    "watch",
]

__version__ = "0.1.0"


def inspect_checkpoint(path, **kwargs) -> Report:  # type: ignore[no-untyped-def]
    """Diagnose a checkpoint from its weights (and optionally one probe pass). See gradscope.checkpoint."""
    from .checkpoint.inspect import inspect_checkpoint as _inspect

    return _inspect(path, **kwargs)
