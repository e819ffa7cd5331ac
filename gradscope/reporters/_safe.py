"""Writing files must never break training: an OSError becomes one warning, then silence."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

from .. import errors

T = TypeVar("T")

# The package-wide warning category when the engine defines one; reporters only need a subclass of it.
_Base: type[Warning] = getattr(errors, "GradscopeWarning", UserWarning)


class ReportingWarning(_Base):  # type: ignore[misc, valid-type]
    """A reporter could not write (disk full, directory removed, no permission) and stopped writing."""


class WriteGuard:
    """Runs write operations; on the first OSError warns once and turns every later call into a no-op.

    Why stop instead of retrying: a disk that is full or a directory that is gone will fail again on
    every collected step, and a warning per step would bury the training log.
    """

    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "TensorBoard logs in runs/exp1", used in the warning
        self.failed = False

    def run(self, func: Callable[[], T]) -> T | None:
        if self.failed:
            return None
        try:
            return func()
        except OSError as exc:
            self.failed = True
            warnings.warn(
                f"gradscope stopped writing {self.what}: {exc}. Training goes on; "
                "the in-memory report (scope.report()) is unaffected.",
                ReportingWarning,
                stacklevel=3,
            )
            return None
