"""The gradient-flow picture: per-layer gradient norm and update ratio over the steps of a run, one PNG or
SVG a person can paste into a pull request or an issue (``gradscope report LOG_DIR --plot FILE``).

It reads what the run already wrote: the per-step scalars of the TensorBoard event files in LOG_DIR
(``grad_norm/<layer>``, ``update_ratio/<layer>``, ``loss``) and, for model order and findings,
gradscope.json. matplotlib is optional (``pip install 'gradscope[plot]'``); it is imported only here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError
from ..findings import Report
from .grouping import group_findings, layer_positions

#: Layers drawn at most; beyond it every layer with a finding is kept and the rest sampled evenly.
MAX_LINES = 48
FORMATS = (".png", ".svg")
STATS = ("grad_norm", "update_ratio")

Curve = list[tuple[int, float]]


def read_curves(log_dir: str | os.PathLike[str]) -> dict[str, dict[str, Curve]]:
    """``{statistic: {layer: [(step, value), ...]}}`` from every event file in ``log_dir`` (plus ``loss``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.fspath(log_dir), size_guidance={"scalars": 0, "histograms": 1,
                                                                  "tensors": 1, "images": 1})
    events.Reload()
    curves: dict[str, dict[str, Curve]] = {stat: {} for stat in (*STATS, "loss")}
    for tag in events.Tags().get("scalars", []):
        stat, _, layer = tag.partition("/")
        if tag == "loss":
            curves["loss"][""] = [(e.step, e.value) for e in events.Scalars(tag)]
        elif stat in STATS and layer:
            name = "" if layer == "model" else layer
            curves[stat][name] = sorted((e.step, e.value) for e in events.Scalars(tag))
    return curves


def write_plot(report: Report, log_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Draw the run in ``log_dir`` into ``path`` (.png or .svg). Raises UsageError with one line."""
    target = os.fspath(path)
    ext = os.path.splitext(target)[1].lower()
    if ext not in FORMATS:
        raise UsageError(f"--plot {target}: the picture must be a .png or .svg file")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'gradscope[plot]' (or pip install matplotlib)") from None
    curves = read_curves(log_dir)
    if not any(curves[stat] for stat in STATS):
        raise UsageError(f"{os.fspath(log_dir)}: no per-layer statistics in its TensorBoard events to plot "
                         "(was it written by gradscope.watch(log_dir=...)?)")
    from matplotlib import rc_context

    # SVG text stays text (searchable, smaller, crisp when pasted), not glyph outlines.
    with rc_context({"svg.fonttype": "none"}):
        fig = draw(Figure, report, curves)
        try:
            fig.savefig(target, dpi=110 if ext == ".png" else None, bbox_inches="tight")
        except OSError as exc:
            raise UsageError(f"--plot {target}: cannot write it: {exc.strerror or exc}") from None


def draw(figure_cls: Any, report: Report, curves: dict[str, dict[str, Curve]]) -> Any:
    """The figure: loss (when known), gradient norm and update ratio per layer, coloured by depth."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    order = layer_positions(report.layers)
    flagged = _flagged(report)
    names = [n for n in sorted(set(curves["grad_norm"]) | set(curves["update_ratio"]),
                               key=lambda n: (order.get(n, 1 << 30), n))]
    weighted = [n for n in names if n in curves["update_ratio"]]
    shown = _pick(weighted or names, flagged, MAX_LINES)
    panels = [("loss", "loss")] if curves["loss"] else []
    panels += [("grad_norm", "‖gradient‖ at the layer's output"), ("update_ratio", "update ‖Δw‖ / ‖w‖ per step")]
    panels = [(stat, label) for stat, label in panels if stat == "loss" or any(n in curves[stat] for n in shown)]

    heights = [1.0 if stat == "loss" else 2.0 for stat, _ in panels]
    fig = figure_cls(figsize=(9.0, 1.6 + 1.9 * sum(heights) / 2), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    cmap = colormaps["viridis"]
    depth = Normalize(vmin=0, vmax=max(len(shown) - 1, 1))
    for ax, (stat, label) in zip(axes, panels, strict=True):
        if stat == "loss":
            steps = [s for s, _ in curves["loss"][""]]
            values = [v if math.isfinite(v) else math.nan for _, v in curves["loss"][""]]
            ax.plot(steps, values, color="0.2", linewidth=1.2)
            finite = [v for v in values if math.isfinite(v)]
            if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
                ax.set_yscale("log")
        else:
            for i, name in enumerate(shown):
                if name not in curves[stat]:
                    continue
                steps, values = _xy(curves[stat][name])
                bad = name in flagged
                ax.plot(steps, values, color=cmap(depth(i)), linewidth=2.0 if bad else 1.0,
                        alpha=1.0 if bad else 0.8, label=name or "(model)")
            ax.set_yscale("log")
            if stat == "update_ratio":
                ax.axhline(1e-3, color="0.5", linestyle=":", linewidth=1)  # where healthy training sits
        ax.set_ylabel(label, fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    axes[-1].set_xlabel("step")
    _legend(fig, axes, shown, flagged, cmap, depth)
    fig.suptitle(_title(report), fontsize=10, x=0.01, ha="left")
    return fig


def _legend(fig: Any, axes: Sequence[Any], shown: list[str], flagged: dict[str, str], cmap: Any, depth: Any) -> None:
    """A depth colour bar from the first to the last layer; layers with a finding named, drawn thicker."""
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=depth, cmap=cmap), ax=list(axes), fraction=0.03, pad=0.01)
    ticks = sorted({0, len(shown) - 1} | {i for i, n in enumerate(shown) if n in flagged})
    if len(ticks) > 12:  # too many to name: the ends and an even sample
        ticks = sorted({ticks[round(k * (len(ticks) - 1) / 11)] for k in range(12)})
    bar.set_ticks(ticks)
    bar.set_ticklabels([_label(shown[i], flagged) for i in ticks], fontsize=7)
    bar.set_label("layer, input → output (thick: a finding)", fontsize=8)


def _label(name: str, flagged: dict[str, str]) -> str:
    from .terminal import shorten

    text = shorten(name or "(model)", 28)
    return f"{text}  ({flagged[name]})" if name in flagged else text


def _title(report: Report) -> str:
    groups = group_findings(report.findings, report.layers)
    serious = [g for g in groups if g.severity != "info"]
    if not serious:
        return f"gradscope · {report.steps} steps · healthy: no problems found"
    g = serious[0]
    ends = " … ".join(dict.fromkeys((g.layers[0] or "(model)", g.layers[-1] or "(model)")))
    more = f" (+{len(serious) - 1} more)" if len(serious) > 1 else ""
    return f"gradscope · {report.steps} steps · {g.severity}: {g.kind} at {ends}{more}"


def _flagged(report: Report) -> dict[str, str]:
    """Layers with a finding above info, and the kind of the worst one."""
    out: dict[str, str] = {}
    for f in report.findings:  # most severe first
        if f.severity != "info" and f.layer not in out:
            out[f.layer] = f.kind
    return out


def _pick(names: list[str], keep: dict[str, str], limit: int) -> list[str]:
    if len(names) <= limit:
        return names
    marked = [n for n in names if n in keep][:limit]
    others = [n for n in names if n not in keep]
    room = limit - len(marked)
    sample = {others[round(k * (len(others) - 1) / max(room - 1, 1))] for k in range(room)} if room > 0 else set()
    chosen = set(marked) | sample
    return [n for n in names if n in chosen]


def _xy(curve: Curve) -> tuple[list[int], list[float]]:
    """Steps and values; a non-finite or non-positive value breaks the line (log axes) instead of lying."""
    steps = [s for s, _ in curve]
    values = [v if math.isfinite(v) and v > 0 else math.nan for _, v in curve]
    return steps, values
