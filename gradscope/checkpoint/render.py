"""The terminal view of an inspection: a verdict, the findings, and the per-layer weight table.

It reads only the Report (``findings`` and ``layers``) and the file facts of the Inspection, as the
reporters do for a training run; the weight-table columns are the rows of ``Report.layers``.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..reporters.terminal import findings_table, fmt, shorten, verdict
from .inspect import Inspection

#: Table rows shown before "... N more"; the JSON (--json) always has all of them.
MAX_ROWS = 400


def render_inspection(inspection: Inspection, console: Console, max_rows: int = MAX_ROWS) -> None:
    """Print the inspection onto ``console``."""
    report = inspection.report
    facts = [f"{inspection.format}", f"{inspection.tensors} tensors", _size(inspection.total_bytes),
             f"read in {inspection.seconds:.1f} s"]
    trained = ", ".join(f"{k} {v}" for k, v in inspection.meta.items() if k not in ("wrapper", "optimizer_state"))
    if inspection.meta.get("wrapper"):
        facts.append(f"weights under {inspection.meta['wrapper']!r}")
    if trained:
        facts.append(trained)
    lines = [verdict(report), Text(str(inspection.path), style="bold"), Text(" · ".join(facts), style="dim")]
    if report.steps:
        lines.append(Text(f"probe: {report.steps} forward/backward pass{'es' * (report.steps > 1)} on "
                          "synthetic input, weights not updated", style="dim"))
    console.print(Panel(Group(*lines), title="[bold]gradscope inspect[/]", title_align="left", box=box.ROUNDED))
    if report.findings:
        console.print(findings_table(report, console.width))  # grouped and named as in a training report
    console.print(_weights(report.layers, console.width, max_rows))


def _weights(layers: dict[str, dict[str, Any]], width: int, max_rows: int) -> Table:
    probed = any("grad_norm" in info or "param_grad_norm" in info for info in layers.values())
    table = Table(title="Weights", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    rows_all = [row for info in layers.values() for row in info.get("tensors", {}).values()]
    shape_width = max(5, min(11, max((len(_shape(r)) for r in rows_all), default=5)))  # >= the header
    dtype_width = max(5, max((len(str(r.get("dtype", ""))) for r in rows_all), default=5))
    # Every other column has a fixed width, so the name gets what is left and is shortened to exactly that
    # (rich would otherwise squeeze it and cut names at both ends).
    fixed = shape_width + dtype_width + 3 * 7 + 5 + (7 if probed else 0) + 2 * (7 if probed else 6)
    name_width = max(12, min(60, width - fixed))
    table.add_column("tensor", no_wrap=True, width=name_width)
    table.add_column("shape", no_wrap=True, width=shape_width, overflow="ellipsis")
    table.add_column("dtype", no_wrap=True, width=dtype_width)
    for col in ("RMS", "abs-max", "σ≈"):
        table.add_column(col, justify="right", no_wrap=True, width=7)
    table.add_column("zeros", justify="right", no_wrap=True, width=5)
    if probed:
        table.add_column("grad", justify="right", no_wrap=True, width=7)
    rows = 0
    total = sum(len(info.get("tensors", {})) for info in layers.values())
    for layer, info in layers.items():
        grad = info.get("param_grad_norm", info.get("grad_norm"))
        for leaf, row in info.get("tensors", {}).items():
            if rows >= max_rows:
                table.caption = f"… and {total - rows} more tensors (all of them with --json)"
                return table
            name = f"{layer}.{leaf}" if layer else leaf
            bad = row.get("nonfinite", 0)
            cells = [
                Text(shorten(name, name_width), style="bold red" if bad else ""),
                _shape(row),
                row["dtype"],
                _num(row["rms"]),
                _num(row["abs_max"]),
                _num(row.get("spectral_norm")),
                f"{row['zero_fraction']:.0%}" if isinstance(row["zero_fraction"], float) else "—",
            ]
            if probed:
                cells.append(_num(grad) if leaf == next(iter(info["tensors"])) else "")
            table.add_row(*cells)
            rows += 1
    return table


def _shape(row: dict[str, Any]) -> str:
    return "×".join(str(d) for d in row.get("shape", ())) or "scalar"


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):  # "nan" / "inf" as stored in the JSON-safe rows
        return value
    return fmt(float(value))


def _size(nbytes: int) -> str:
    if nbytes < 1000:
        return f"{nbytes} B"
    value, unit = next((nbytes / f, u) for f, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if nbytes >= f)
    return f"{value:.1f} {unit}"
