"""Typed findings and the report that holds them: the contract's output records."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "critical": 2}[self.value]


class Kind(str, Enum):
    """The fixed vocabulary of ../shared/CONTRACT.md; new kinds may be added, none renamed."""

    VANISHING_GRADIENT = "vanishing_gradient"
    EXPLODING_GRADIENT = "exploding_gradient"
    DEAD_RELU = "dead_relu"
    SATURATED_ACTIVATION = "saturated_activation"
    NORMALIZATION_DRIFT = "normalization_drift"
    NONFINITE = "nonfinite"
    UNUSED_PARAMETER = "unused_parameter"
    NOT_IN_OPTIMIZER = "not_in_optimizer"
    UPDATE_RATIO = "update_ratio"
    LOSS_DIVERGENCE = "loss_divergence"
    # The model starts confidently wrong: weights initialized far too large (first loss >> ln(C), or
    # activations growing layer over layer at the first step).
    INIT_SCALE = "init_scale"
    # Weight-only checkpoint analysis: a tensor whose scale is an outlier among its peers.
    WEIGHT_OUTLIER = "weight_outlier"


Evidence = dict[str, "float | int | str"]


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: keep them readable as strings instead of emitting invalid JSON."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item"):  # numpy / torch scalars
        return _clean(value.item())
    return str(value)


@dataclass
class Finding:
    kind: str
    severity: str
    layer: str
    step: int | None
    message: str
    hint: str
    evidence: dict[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept the enums but store plain strings, as the contract spells them.
        self.kind = Kind(self.kind).value
        self.severity = Severity(self.severity).value
        self.evidence = {str(k): _clean(v) for k, v in self.evidence.items()}

    @property
    def rank(self) -> int:
        return Severity(self.severity).rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(
            kind=data["kind"],
            severity=data["severity"],
            layer=data.get("layer", ""),
            step=data.get("step"),
            message=data.get("message", ""),
            hint=data.get("hint", ""),
            evidence=dict(data.get("evidence", {})),
        )


def sort_findings(findings: list[Finding], layer_order: dict[str, int] | None = None) -> list[Finding]:
    """Most severe first; among equals the root causes (NaN's origin, an explosion or divergence, a finding
    that others were folded into) earliest step first, so a blow-up that later turned into NaN leads the
    NaN it caused; then the rest in model order, so the earliest affected layer leads."""
    order = layer_order or {}

    # A blow-up (gradients exploding, the loss diverging) that began before a NaN is that NaN's cause.
    blow_up = (Kind.NONFINITE.value, Kind.EXPLODING_GRADIENT.value, Kind.LOSS_DIVERGENCE.value)

    def key(f: Finding) -> tuple:
        step = f.step if f.step is not None else -1
        if f.kind in blow_up or "folded" in f.evidence:
            return (-f.rank, 0, step, 0 if f.kind == Kind.NONFINITE.value else 1, order.get(f.layer, 1 << 30), f.kind)
        return (-f.rank, 1, 0, 0, order.get(f.layer, 1 << 30), step, f.kind)

    return sorted(findings, key=key)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    steps: int = 0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.severity == Severity.CRITICAL.value for f in self.findings)

    def by_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "steps": int(self.steps),
            "findings": [f.to_dict() for f in self.findings],
            "layers": {name: {k: _clean(v) if not isinstance(v, (dict, list)) else v for k, v in info.items()}
                       for name, info in self.layers.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        if not isinstance(data, dict) or data.get("version") != 1 or "findings" not in data:
            raise ValueError("not a gradscope report (expected version 1 with findings)")
        return cls(
            findings=[Finding.from_dict(f) for f in data["findings"]],
            steps=int(data.get("steps", 0)),
            layers=dict(data.get("layers", {})),
        )

    def __repr__(self) -> str:
        counts = {s.value: sum(f.severity == s.value for f in self.findings) for s in Severity}
        return f"Report(steps={self.steps}, ok={self.ok}, findings={counts})"
