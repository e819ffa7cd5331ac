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
from .grouping import FindingGroup, group_findings

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
        console.print(findings_table(report, console.width))
    flow = _flow_table(report, console.width)
    if flow is not None:
        console.print()
        console.print(flow)
    for line in unmeasured_lines(report):
        console.print(line)


def unmeasured_lines(report: Report) -> list[Text]:
    """Layers whose statistics gradscope switched off after an error in them, and why (one line each)."""
    out = []
    for name, info in report.layers.items():
        reason = info.get("unmeasured") if isinstance(info, dict) else None
        if reason:
            line = Text("not measured: ", style="yellow")
            line.append(name or "(model)", style="cyan")
            line.append(f": {reason}", style="dim")
            out.append(line)
    return out


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
    groups = sorted(group_findings(report.findings, report.layers), key=lambda g: g.kind not in first)  # stable
    for i, g in enumerate(groups[:limit]):
        f = g.lead
        head = Text("  ")
        head.append(SEVERITY_LABEL[g.severity], style=SEVERITY_STYLE[g.severity])
        head.append(f" {g.kind}", style="bold")
        where = " … ".join(dict.fromkeys((g.layers[0] or "(model)", g.layers[-1] or "(model)")))
        size = f" ({len(g.layers)} layers)" if len(g.layers) > 1 else ""
        when = "" if g.step is None else (f", from step {g.step}" if size else f", step {g.step}")
        head.append(f" at {where}{size}{when}", style="cyan")
        console.print(head)
        console.print(Padding(Text(f.message), (0, 0, 0, 7)))
        if f.hint and i == 0:  # one fix is enough in a brief; the full report has all of them
            console.print(Padding(Text("→ " + f.hint, style="dim"), (0, 0, 0, 7)))
    rest = groups[limit:]
    if rest:
        counts: dict[str, int] = {}
        for g in rest:
            counts[g.kind] = counts.get(g.kind, 0) + len(g.layers)
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
    top = group_findings(report.findings, report.layers)[0]
    parts = [f"{n} {s}{'s' * (n > 1 and s == 'warning')}" for s, n in counts.items() if n and s != "info"]
    ends = list(dict.fromkeys((top.layers[0], top.layers[-1])))
    where = f" at {' … '.join(ends)}" if any(ends) else ""
    span = f"{len(top.layers)} layers, " if len(top.layers) > 1 else ""
    when = f" ({span}step {top.step})" if top.step is not None else (f" ({span[:-2]})" if span else "")
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
    clip = s.get("clipping") or {}
    share = as_float(clip.get("clipped_share"))
    if share:
        # Clipping that acts on most steps sets the step size itself: the gradients are larger than meant.
        lines.append(Text(f"gradient clipping acted on {share:.0%} of collected steps (norm cut by ×"
                          f"{fmt(as_float(clip.get('median_ratio')))} median, ×{fmt(as_float(clip.get('max_ratio')))} max)",
                          style="yellow" if share > 0.5 else "dim"))
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


def findings_table(report: Report, width: int) -> Table:
    """The findings, one row per kind over a contiguous run of layers (see :mod:`.grouping`)."""
    groups = group_findings(report.findings, report.layers)
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
    # Room for the longest kind (saturated_activation) and a layer's last two parts at 80 columns.
    kind_width = 22 if width >= 80 else min(22, max(len(g.kind) for g in groups))
    table.add_column("kind · layer", width=kind_width, no_wrap=True, overflow="ellipsis")
    table.add_column("step", justify="right", width=5, no_wrap=True)
    table.add_column("what · fix", ratio=1, overflow="fold")
    hinted: set[str] = set()
    for g in groups[:MAX_FINDINGS]:
        f = g.lead
        where = Text(g.kind, style="bold")
        where.append("\n")
        where.append(layer_span(g.layers, kind_width), style="cyan")
        what = Text()
        full = _full_names(g, kind_width)
        if full:
            what.append(full + "\n", style="cyan")
        what.append(f.message)
        what.append(_evidence_notes(f), style="dim")
        if f.hint and f.hint not in hinted:  # the same fix for ten rows is said once, at the first
            what.append("\n→ " + f.hint, style="dim")
            hinted.add(f.hint)
        step = "—" if g.step is None else str(g.step)
        table.add_row(Text(SEVERITY_LABEL[g.severity], style=SEVERITY_STYLE[g.severity]), where, step, what)
    if len(groups) > MAX_FINDINGS:
        rest = groups[MAX_FINDINGS:]
        table.caption = (f"… and {len(rest)} more rows ({sum(len(g.findings) for g in rest)} findings; "
                         "all of them in gradscope.json / --json)")
    return table


def _evidence_notes(f: Finding) -> str:
    """What the analyzers folded into a root finding, and which gate lowered a finding to info."""
    notes = ""
    folded = f.evidence.get("folded_count")
    if isinstance(folded, (int, float)) and folded > 0:
        notes += f"\nexplains {int(folded)} later finding{'s' * (folded != 1)} folded into it"
    gate = f.evidence.get("gate")
    if gate and f.severity == "info":
        notes += f"\nlowered to info: {gate}"
    return notes


def layer_span(layers: Sequence[str], width: int) -> str:
    """``fc0`` for one layer, ``fc0 … fc13`` for a run; where the ends differ in one place only, that
    place: ``transformer.h.0…11.mlp.c_fc``, shortened as :func:`shorten` does (``t.h.0…11.mlp.c_fc``);
    otherwise the first layer and how many more (``transformer.wte +9``)."""
    names = [n or "(model)" for n in layers]
    if len(names) == 1:
        return shorten(names[0], width)
    a, b = names[0], names[-1]
    both = f"{a} … {b}"
    if len(both) <= width:
        return both
    pa, pb = a.split("."), b.split(".")
    if len(pa) == len(pb) and len(pa) > 1:
        n = len(pa)
        k = next((i for i in range(n) if pa[i] != pb[i]), n)
        m = next((i for i in range(n - k) if pa[n - 1 - i] != pb[n - 1 - i]), n - k)
        mid = f"{'.'.join(pa[k : n - m])}…{'.'.join(pb[k : n - m])}"
        head, tail = pa[:k], pa[n - m :]
        for candidate in (
            ".".join([*head, mid, *tail]),
            ".".join([*(p if p.isdigit() else p[:1] for p in head), mid, *tail]),
            "…" + ".".join([mid, *tail]),
        ):
            if len(candidate) <= width:
                return candidate
    more = f" +{len(names) - 1}"  # the ends are named in full in the row's message
    return shorten(a, max(1, width - len(more))) + more


def _full_names(g: FindingGroup, width: int) -> str:
    """The line that names the group's layers in full, once: always for a run, for one layer when shortened."""
    layers = g.layers
    if len(layers) == 1:
        name = layers[0]
        return name if name and shorten(name, width) != name else ""
    counts = g.severity_counts()
    mixed = f" ({', '.join(f'{n} {s}' for s, n in counts.items())})" if len(counts) > 1 else ""
    when = "" if g.step is None else f", from step {g.step}"
    return f"{layers[0]} … {layers[-1]}, {len(layers)} layers{when}{mixed}"


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
    """Fit a dotted module name into ``width``, one way everywhere: a name that fits stays whole;
    otherwise every part but the last two becomes its initial (numbers stay whole), then parts go from
    the left behind "…"; the last two parts are kept whole as long as they fit at all.

    ``encoder.layers.11.self_attn.out_proj`` → ``e.l.11.self_attn.out_proj`` → ``…11.self_attn.out_proj``
    → ``…self_attn.out_proj``.
    """
    if len(name) <= width:
        return name
    parts = name.split(".")
    if len(parts) > 2:
        head = [p if p.isdigit() else p[:1] for p in parts[:-2]]
        tail = parts[-2:]
        candidate = ".".join(head + tail)
        if len(candidate) <= width:
            return candidate
        for k in range(1, len(head) + 1):
            candidate = "…" + ".".join(head[k:] + tail)
            if len(candidate) <= width:
                return candidate
    if width <= 1:
        return "…"[:width]
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
