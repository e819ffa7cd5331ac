"""Findings of one kind over a contiguous run of layers, shown as one row: what a person reads first.

A vanishing gradient through 14 layers is one problem, not 14; a report that lists it 14 times, each
with the same message and fix, buries whatever else it found. ``Report.findings`` and gradscope.json
keep one finding per layer (the contract); only the views group.

A run is contiguous in model order: two findings of a kind fall in one group unless a layer between
them, of a type the group already holds, lacks that finding (``fc0 fc1 fc2`` and ``fc5`` are two
groups when ``fc3`` is healthy; the sigmoids between the ``fc`` layers do not split them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..findings import Finding


@dataclass
class FindingGroup:
    """One row of a view: the findings of ``kind`` over a run of layers, in model order."""

    kind: str
    findings: list[Finding]  # in model order
    lead: Finding  # the worst of them (most severe, then first in the report's order): its message is shown

    @property
    def severity(self) -> str:
        return self.lead.severity

    @property
    def layers(self) -> list[str]:
        """Distinct layers in model order."""
        return list(dict.fromkeys(f.layer for f in self.findings))

    @property
    def step(self) -> int | None:
        """The first step any of them was seen (None for a checkpoint)."""
        steps = [f.step for f in self.findings if f.step is not None]
        return min(steps) if steps else None

    def severity_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in ("critical", "warning", "info"):
            n = sum(f.severity == s for f in self.findings)
            if n:
                counts[s] = n
        return counts


def layer_positions(layers: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Model order of the layers of a report: their ``order`` where known, else their place in the dict."""
    keyed = []
    for i, (name, info) in enumerate(layers.items()):
        order = info.get("order") if isinstance(info, dict) else None
        keyed.append((order if isinstance(order, int) and order >= 0 else 1 << 20, i, name))
    return {name: k for k, (_, _, name) in enumerate(sorted(keyed))}


def group_findings(findings: list[Finding], layers: dict[str, dict[str, Any]] | None = None) -> list[FindingGroup]:
    """Group the findings of each kind over contiguous runs of layers; groups in the report's order.

    The report's order is kept between groups: a group stands where its first member stood, so the
    first row is the report's first finding (the root cause, which the analyzers put first).
    """
    layers = layers or {}
    pos = layer_positions(layers)
    by_pos = sorted(pos, key=pos.__getitem__)
    rank = {id(f): i for i, f in enumerate(findings)}

    by_kind: dict[str, list[Finding]] = {}
    for f in findings:
        by_kind.setdefault(f.kind, []).append(f)

    groups: list[FindingGroup] = []
    for kind, members in by_kind.items():
        placed = sorted((f for f in members if f.layer in pos), key=lambda f: pos[f.layer])
        alone = [f for f in members if f.layer not in pos]  # the model as a whole, or a layer not in the table
        flagged = {f.layer for f in members}
        runs: list[list[Finding]] = []
        for f in placed:
            if runs and _contiguous(runs[-1], f, pos, by_pos, flagged, layers):
                runs[-1].append(f)
            else:
                runs.append([f])
        runs += [[f] for f in alone]
        for run in runs:
            lead = min(run, key=lambda f: (-f.rank, rank[id(f)]))
            groups.append(FindingGroup(kind, run, lead))
    groups.sort(key=lambda g: min(rank[id(f)] for f in g.findings))
    return groups


def _contiguous(run: list[Finding], f: Finding, pos: dict[str, int], by_pos: list[str], flagged: set[str],
                layers: dict[str, dict[str, Any]]) -> bool:
    last = run[-1].layer
    if f.layer == last:
        return True
    types = {_type(layers, g.layer) for g in run} | {_type(layers, f.layer)}
    between = by_pos[pos[last] + 1 : pos[f.layer]]
    return not any(name not in flagged and _type(layers, name) in types for name in between)


def _type(layers: dict[str, dict[str, Any]], name: str) -> Any:
    info = layers.get(name)
    if not isinstance(info, dict) or info.get("role") == "container":
        return "(container)"  # never counted as a gap: a container only repeats its children
    return info.get("type")
