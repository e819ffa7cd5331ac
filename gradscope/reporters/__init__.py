"""Reporters render Reports and collected statistics; they compute nothing of their own.

- terminal.py: the rich terminal report (``print_report``, ``render_report``, ``render_brief``)
- tensorboard.py: ``TensorBoardWriter``, event files for TensorBoard
- json.py: ``write_json``, the atomic gradscope.json
"""

from __future__ import annotations

from ._safe import ReportingWarning

__all__ = ["ReportingWarning"]
