"""``gradscope.json``: exactly ``Report.to_dict()``, replaced atomically; the run summary (loss curve,
learning-rate schedule) goes beside it in ``gradscope-summary.json`` so the report file stays the
contract's shape.

A reader (``gradscope report``, a dashboard, a CI job) never sees a half-written file: the new content
goes to a temporary file in the same directory, then ``os.replace`` swaps it in, which is atomic on
POSIX and Windows as long as both names are on one filesystem.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from typing import Any

from ..findings import Report
from ._safe import WriteGuard

#: The file names inside a run's log_dir.
JSON_NAME = "gradscope.json"
SUMMARY_NAME = "gradscope-summary.json"

# One guard per target file: a failing path warns once, however many reports the run makes.
_guards: dict[str, WriteGuard] = {}


def write_json(report: Report, path: str | os.PathLike[str], summary: dict[str, Any] | None = None) -> bool:
    """Atomically write ``report.to_dict()`` to ``path`` (and ``summary`` to gradscope-summary.json beside
    it); on OSError warn once (per path) and return False."""
    target = os.path.abspath(os.fspath(path))
    guard = _guards.setdefault(target, WriteGuard(f"the report to {target}"))
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False)
    written = guard.run(lambda: replace_atomically(target, text)) is not None
    if written and summary:
        side = os.path.join(os.path.dirname(target), SUMMARY_NAME)
        side_text = json.dumps(_json_safe(summary), indent=2, allow_nan=False)
        written = guard.run(lambda: replace_atomically(side, side_text)) is not None
    return written


def replace_atomically(target: str, text: str) -> bool:
    """Write ``text`` (plus a newline) to ``target`` through a temporary file and ``os.replace``."""
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    # Not tempfile.mkstemp: it creates the file 0600 whatever the umask, and os.replace keeps that mode,
    # so the report would be private while the event files beside it are not. os.open with 0o666 lets
    # the user's umask decide, as it does for every other file the run writes; O_EXCL keeps it ours.
    tmp = os.path.join(directory, f".gradscope-{secrets.token_hex(8)}.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        # Leave no temporary file behind, whatever went wrong (disk full mid-write, KeyboardInterrupt).
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as the strings "nan"/"inf", as Report.to_dict() does."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float) or hasattr(value, "item"):
        x = float(value.item() if hasattr(value, "item") else value)
        if math.isfinite(x):
            return x
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return str(value)


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a gradscope.json; raises OSError / ValueError for the CLI to turn into one line."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("not a gradscope report")
    return data


def read_summary(report_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run summary beside a gradscope.json, if there is a readable one (it is optional)."""
    side = os.path.join(os.path.dirname(os.path.abspath(os.fspath(report_path))), SUMMARY_NAME)
    try:
        with open(side, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
