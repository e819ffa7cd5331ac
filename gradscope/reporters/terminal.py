"""The rich terminal report: a summary, the findings, and the gradient flow through the model.

Everything shown comes from ``Report.to_dict()`` (plus the optional run ``summary`` of
:mod:`gradscope.reporters.summary`), so ``gradscope report`` renders a saved run exactly as the live
scope does. Rich drops colour by itself when the console is not a terminal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..findings import Finding, Report
from ._kinds import stats_for
from ._values import as_float

SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "blue"}
SEVERITY_LABEL = {"critical": "CRIT", "warning": "WARN", "info": "info"}
SEVERITY_ICON = {"critical": "✖", "warning": "▲", "info": "·"}

#: Rows beyond which the flow table keeps every layer with a finding and an even sample of the rest.
MAX_LAYERS = 40
#: Findings shown before "... and N more".
MAX_FINDINGS = 20

_BLOCKS = " ▏▎▍▌▋▊▉█"  # eighth-width steps, so a 10-cell bar resolves 80 levels
_SPARKS = "▁▂▃▄▅▆▇█"


def print_report(
    report: Report, console: Console | None = None, summary: dict[str, Any] | None = None
) -> None:
    """Print the report to ``console`` (a new stdout Console when None)."""
    render_report(report, console if console is not None else Console(), summary=summary)


def render_report(report: Report, console: Console, summary: dict[str, Any] | None = None) -> None:
    """Render the summary panel, the findings table and the gradient-flow table onto ``console``."""
    console.print(_summary_panel(report, summary))
    if report.findings:
        console.print()
        console.print(_findings_table(report.findings, console.width))
    flow = _flow_table(report, console.width)
    if flow is not None:
        console.print()
        console.print(flow)


def render_brief(
    report: Report,
    console: Console,
    summary: dict[str, Any] | None = None,
    first: Sequence[str] = (),
    limit: int = 2,
) -> None:
    """A few lines: the leading findings (those of the kinds in ``first`` lead), then counts of the rest.

    For many reports in a row (``gradscope demo``), where the full report of each would be too long.
    """
    s = summary or {}
    findings = sorted(report.findings, key=lambda f: f.kind not in first)  # stable: severity order kept
    for i, f in enumerate(findings[:limit]):
        head = Text("  ")
        head.append(SEVERITY_LABEL[f.severity], style=SEVERITY_STYLE[f.severity])
        head.append(f" {f.kind}", style="bold")
        head.append(f" at {f.layer or '(model)'}" + ("" if f.step is None else f", step {f.step}"), style="cyan")
        console.print(head)
        console.print(Padding(Text(f.message), (0, 0, 0, 7)))
        if f.hint and i == 0:  # one fix is enough in a brief; the full report has all of them
            console.print(Padding(Text("→ " + f.hint, style="dim"), (0, 0, 0, 7)))
    rest = findings[limit:]
    if rest:
        counts: dict[str, int] = {}
        for f in rest:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        also = "also: " + ", ".join(f"{k} ×{n}" for k, n in counts.items())
        console.print(Padding(Text(also, style="dim"), (0, 0, 0, 2)))
    if not report.findings:
        console.print(Text("  no findings", style="green"))
    first_loss, last_loss = as_float(s.get("loss_first")), as_float(s.get("loss_last"))
    if first_loss is not None or last_loss is not None:
        console.print(Text(f"  loss {fmt(first_loss)} → {fmt(last_loss)} over {report.steps} steps", style="dim"))


# --- summary -----------------------------------------------------------------------------------------


def verdict(report: Report) -> Text:
    """One line: healthy, or how many problems and the most severe one."""
    counts = {s: sum(f.severity == s for f in report.findings) for s in SEVERITY_STYLE}
    actionable = counts["critical"] + counts["warning"]
    if not actionable:
        notes = f" ({counts['info']} note{'s' * (counts['info'] != 1)} below)" if counts["info"] else ""
        return Text(f"✔ Healthy: no problems found{notes}.", style="bold green")
    top = report.findings[0]
    parts = [f"{n} {s}{'s' * (n > 1 and s == 'warning')}" for s, n in counts.items() if n and s != "info"]
    where = f" at {top.layer}" if top.layer else ""
    when = f" (step {top.step})" if top.step is not None else ""
    icon = SEVERITY_ICON[top.severity]
    return Text(f"{icon} {', '.join(parts)}. First: {top.kind}{where}{when}.", style=SEVERITY_STYLE[top.severity])


def _summary_panel(report: Report, summary: dict[str, Any] | None) -> Panel:
    s = summary or {}
    lines: list[Text] = [verdict(report)]
    facts = [f"{report.steps} steps seen", f"{len(report.layers)} layers watched"]
    if s.get("collected"):
        facts.append(f"statistics from {s['collected']} collected steps")
    lines.append(Text(" · ".join(facts), style="dim"))
    skipped = as_float(s.get("skipped_steps"))
    if skipped:
        # GradScaler skips optimizer steps whose gradients overflowed; many of them mean fp16 trouble.
        lines.append(Text(f"{skipped:.0f} optimizer steps skipped (inf/NaN gradients)", style="yellow"))
    loss = _loss_line(s)
    if loss is not None:
        lines.append(loss)
    lines.extend(_lr_lines(s))
    return Panel(Group(*lines), title="[bold]gradscope[/]", title_align="left", box=box.ROUNDED, expand=True)


def _loss_line(s: dict[str, Any]) -> Text | None:
    first, last = as_float(s.get("loss_first")), as_float(s.get("loss_last"))
    if first is None and last is None:
        return None
    line = Text("loss ", style="bold")
    line.append(f"{fmt(first)} → ", style="")
    line.append(fmt(last), style="bold red" if last is not None and not math.isfinite(last) else "bold")
    low = as_float(s.get("loss_min"))
    if low is not None:
        line.append(f" (min {fmt(low)})", style="dim")
    curve = curve_values(s.get("loss_curve"))
    if len(curve) > 1:
        line.append("  ")
        line.append_text(sparkline(curve))
    return line


def _lr_lines(s: dict[str, Any]) -> list[Text]:
    lrs = [as_float(v) for v in s.get("lrs") or []]
    if not lrs:
        return []
    firsts = [as_float(v) for v in s.get("lrs_first") or []]
    curves = s.get("lr_curves") or []
    shown = 2  # beyond two param groups the lines stop being readable; say how many were left out
    lines = []
    for g, last in enumerate(lrs[:shown]):
        label = "lr " if len(lrs) == 1 else f"lr[{g}] "
        line = Text(label, style="bold")
        first = firsts[g] if g < len(firsts) else None
        if first is not None and first != last:
            line.append(f"{fmt(first)} → ")
        line.append(fmt(last), style="bold")
        curve = curve_values(curves[g]) if g < len(curves) else []
        if len(curve) > 1 and max((c or 0) for c in curve) > min((c or 0) for c in curve):
            line.append("  ")
            line.append_text(sparkline(curve, log=False))
        lines.append(line)
    if len(lrs) > shown:
        lines.append(Text(f"   … and {len(lrs) - shown} more param groups", style="dim"))
    return lines


def curve_values(points: Any) -> list[float | None]:
    """The values of a summary curve: ``[step, value]`` pairs (as the summary writes them) or bare numbers."""
    if not isinstance(points, (list, tuple)):
        return []
    return [as_float(p[1] if isinstance(p, (list, tuple)) and len(p) == 2 else p) for p in points]


# --- findings ----------------------------------------------------------------------------------------


def _findings_table(findings: Sequence[Finding], width: int) -> Table:
    table = Table(
        title="Findings",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        expand=True,
    )
    table.add_column("", width=4, no_wrap=True)
    kind_width = min(22, max(len(f.kind) for f in findings))
    table.add_column("kind · layer", width=kind_width, no_wrap=True, overflow="ellipsis")
    table.add_column("step", justify="right", width=5, no_wrap=True)
    table.add_column("what · fix", ratio=1, overflow="fold")
    hinted: set[str] = set()
    for f in findings[:MAX_FINDINGS]:
        style = SEVERITY_STYLE[f.severity]
        where = Text(f.kind, style="bold")
        where.append("\n")
        where.append(shorten(f.layer, kind_width) if f.layer else "(model)", style="cyan")
        what = Text(f.message)
        if f.hint and f.hint not in hinted:  # the same fix for ten layers is said once, at the first
            what.append("\n→ " + f.hint, style="dim")
            hinted.add(f.hint)
        step = "—" if f.step is None else str(f.step)
        table.add_row(Text(SEVERITY_LABEL[f.severity], style=style), where, step, what)
    if len(findings) > MAX_FINDINGS:
        table.caption = f"… and {len(findings) - MAX_FINDINGS} more (all of them in gradscope.json / --json)"
    return table


# --- gradient flow -----------------------------------------------------------------------------------

# Terminal columns and the statistic keys (of _kinds.KIND_STATS) whose findings colour them.
_COLUMN_STATS = {
    "grad": ("grad_norm", "param_grad_norm"),
    "act": ("act_rms", "norm_drift"),
    "dead": ("dead_frac", "saturated_frac"),
    "upd": ("update_ratio",),
}


def _flow_rows(report: Report) -> list[tuple[str, dict[str, Any]]]:
    rows = [(n, info) for n, info in report.layers.items() if info.get("role") != "container"]
    return rows or list(report.layers.items())


def _pick(rows: list[tuple[str, dict[str, Any]]], keep: set[str], limit: int) -> list[tuple[str, dict[str, Any]]]:
    """At most ``limit`` rows in model order: every layer with a finding, then an even sample of the rest."""
    if len(rows) <= limit:
        return rows
    marked = [i for i, (n, _) in enumerate(rows) if n in keep][:limit]
    others = [i for i in range(len(rows)) if i not in set(marked)]
    room = limit - len(marked)
    sample = [others[round(k * (len(others) - 1) / max(room - 1, 1))] for k in range(room)] if room > 0 else []
    return [rows[i] for i in sorted(set(marked) | set(sample))]


def _flow_table(report: Report, width: int) -> Table | None:
    rows = _flow_rows(report)
    if not rows:
        return None
    by_layer: dict[str, list[Finding]] = {}
    for f in report.findings:
        by_layer.setdefault(f.layer, []).append(f)
    shown = _pick(rows, set(by_layer), MAX_LAYERS)

    grads = [as_float(info.get("grad_norm")) for _, info in rows]
    lo, hi = decade_range(grads)
    bar_width = 10 if width < 100 else 16
    type_width = min(11, max((len(str(info.get("type") or "")) for _, info in shown), default=4))
    # What is left for the name: 7 columns, 6 gaps of 2 (collapsed padding), the fixed widths below.
    name_width = max(10, min(max(len(n) for n, _ in shown), width - (12 + 1 + type_width + bar_width + 8 + 22)))

    table = Table(
        title=f"Gradient flow, in model order · bars: ‖output grad‖, log scale {_decade(lo)} … {_decade(hi)}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        min_width=min(width, 80),  # room for the title and the legend even when names are short
    )
    table.add_column("", width=1, no_wrap=True)
    table.add_column("layer", width=name_width, no_wrap=True, overflow="ellipsis")
    table.add_column("type", width=type_width, no_wrap=True, overflow="ellipsis", style="dim")
    table.add_column("grad norm", width=bar_width + 8, no_wrap=True)
    table.add_column("act rms", justify="right", width=7, no_wrap=True)
    table.add_column("dead|sat", justify="right", width=8, no_wrap=True)
    table.add_column("upd/w", justify="right", width=7, no_wrap=True)

    for name, info in shown:
        found = by_layer.get(name, [])
        worst = max(found, key=lambda f: f.rank, default=None)
        marks = _column_styles(found)
        nonfinite = any(f.kind == "nonfinite" for f in found)
        grad = as_float(info.get("grad_norm"))
        bar = Text(log_bar(grad, lo, hi, bar_width), style=marks.get("grad", "cyan"))
        bar.append(" " + fmt(grad).rjust(7), style=marks.get("grad", ""))
        table.add_row(
            Text(SEVERITY_ICON[worst.severity], style=SEVERITY_STYLE[worst.severity]) if worst else "",
            Text(shorten(name, name_width) if name else "(model)", style="bold red" if nonfinite else ""),
            str(info.get("type") or ""),
            bar,
            Text(fmt(as_float(info.get("act_rms"))), style=marks.get("act", "")),
            Text(_dead_or_saturated(info), style=marks.get("dead", "")),
            Text(fmt(as_float(info.get("update_ratio"))), style=marks.get("upd", "")),
        )
    notes = ["dead|sat: ReLU units that never fire / sigmoid-tanh outputs in the flat tails",
             "upd/w: ‖Δw‖/‖w‖ per step"]
    if len(shown) < len(rows):
        notes.insert(0, f"showing {len(shown)} of {len(rows)} layers (every one with a finding)")
    table.caption = "; ".join(notes)
    table.caption_justify = "left"
    return table


def _column_styles(found: Iterable[Finding]) -> dict[str, str]:
    """Colour the cells that show a finding, in the finding's severity colour (the worst one wins)."""
    styles: dict[str, tuple[int, str]] = {}
    for f in found:
        stats = set(stats_for(f.kind))
        for column, column_stats in _COLUMN_STATS.items():
            if stats & set(column_stats) and f.rank >= styles.get(column, (-1, ""))[0]:
                styles[column] = (f.rank, SEVERITY_STYLE[f.severity])
    return {column: style for column, (_, style) in styles.items()}


def _dead_or_saturated(info: dict[str, Any]) -> str:
    role = info.get("role")
    key = "saturated_frac" if role == "saturating" else "dead_frac"
    value = as_float(info.get(key))
    if value is None and role not in ("relu", "saturating"):
        value = as_float(info.get("saturated_frac" if key == "dead_frac" else "dead_frac"))
    return "—" if value is None else f"{value:.0%}"


# --- small formatting helpers ------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    """At most 7 characters: "—", "nan", "0", "0.0123", "12.3", "1.2e-05"."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 0.01 <= abs(value) < 1000:
        return f"{value:.3g}"
    return f"{value:.1e}"


def shorten(name: str, width: int) -> str:
    """Fit a dotted module name into ``width``: abbreviate the outer names first, keep the leaf whole.

    ``encoder.layers.11.self_attn.out_proj`` → ``e.l.11.self_attn.out_proj`` → ``…self_attn.out_proj``.
    """
    if len(name) <= width:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if not parts[i].isdigit():
            parts[i] = parts[i][0]
        candidate = ".".join(parts)
        if len(candidate) <= width:
            return candidate
    return "…" + name[-(width - 1) :]


def decade_range(values: Iterable[float | None]) -> tuple[int, int]:
    """Whole decades spanning the positive finite values (at least two decades, so one value still shows)."""
    logs = [math.log10(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    if not logs:
        return (-2, 0)
    lo, hi = math.floor(min(logs)), math.ceil(max(logs))
    if hi == max(logs):  # a value exactly on a decade still gets headroom above it
        hi += 1
    return (min(lo, hi - 2), hi)


def log_bar(value: float | None, lo: int, hi: int, width: int) -> str:
    """A bar whose length is log10(value) placed between the decades ``lo`` and ``hi``."""
    if value is None:
        return "·".ljust(width)
    if not math.isfinite(value):
        return "!" * width
    if value <= 0:
        return "0".ljust(width)
    frac = (math.log10(value) - lo) / (hi - lo)
    eighths = max(1, round(min(max(frac, 0.0), 1.0) * width * 8))  # never empty: a tiny gradient still shows
    full, rest = divmod(eighths, 8)
    return ("█" * full + (_BLOCKS[rest] if rest else "")).ljust(width)


def sparkline(values: Sequence[float | None], log: bool | None = None) -> Text:
    """A one-line curve; non-finite points in red. Log scale when the values span over two decades."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Text("!" * len(values), style="red")
    if log is None:
        log = min(finite) > 0 and max(finite) / min(finite) > 100
    scale = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = scale(min(finite)), scale(max(finite))
    out = Text()
    for v in values:
        if v is None or not math.isfinite(v):
            out.append("!", style="red")
            continue
        level = 0 if hi == lo else round((scale(v) - lo) / (hi - lo) * (len(_SPARKS) - 1))
        out.append(_SPARKS[level], style="magenta")
    return out


def _decade(exponent: int) -> str:
    return f"1e{exponent:+d}"
