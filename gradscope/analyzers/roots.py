"""Root cause first: findings that only follow from an earlier finding are folded into it.

A NaN makes every later statistic meaningless; a layer whose ReLUs all died cuts the gradient of every
layer before it; a learning rate that blew the weights up leaves tiny relative gradients behind; a
gradient that vanished leaves tiny updates behind. Listing those consequences beside their cause buries
the cause, so each is folded into its root: the root's evidence names them (``folded``) and the report
leads with the root. Independent problems keep one finding per (kind, layer).
"""

from __future__ import annotations

from ..findings import Finding, Kind, Severity

#: (consequence kind, root kind): which findings a root of each kind can explain, and how.
#:   nonfinite        -> anything per layer seen at or after the first NaN/Inf (NaN is never "small")
#:   dead_relu        -> vanishing gradients of earlier layers from the death on (the path back is cut)
#:   update_ratio     -> vanishing gradients from a too-large step on (weights blown up, gradients
#:   loss_divergence     tiny relative to them), for the lr-too-high run that looks "vanishing everywhere"
#:   vanishing        -> too-small updates of the same layer (the step follows the gradient)
#:   loss_divergence  -> too-large updates that began only after the loss had diverged
_AFTER_NAN = frozenset({Kind.VANISHING_GRADIENT.value, Kind.DEAD_RELU.value, Kind.UPDATE_RATIO.value,
                        Kind.SATURATED_ACTIVATION.value, Kind.NORMALIZATION_DRIFT.value})


def _loud(f: Finding) -> bool:
    return f.severity != Severity.INFO.value


def _fold(root: Finding, child: Finding) -> None:
    """The root takes the child's place: it names the child, and is at least as severe."""
    if child.rank > root.rank:
        root.severity = child.severity
    where = f"{child.kind}@{child.layer or 'model'}"
    old = str(root.evidence.get("folded", ""))
    root.evidence["folded"] = f"{old}, {where}" if old else where
    root.evidence["folded_count"] = int(root.evidence.get("folded_count", 0)) + 1


def _too_large(f: Finding) -> bool:
    return f.kind == Kind.UPDATE_RATIO.value and "update_ratio_max" in f.evidence and _loud(f)


def fold(findings: list[Finding], order: dict[str, int]) -> list[Finding]:
    """Fold consequences into their roots; returns the findings left standing, roots marked."""
    rank = {id(f): order.get(f.layer, 1 << 30) for f in findings}
    folded: set[int] = set()

    def claim(root: Finding, children: list[Finding]) -> None:
        for c in children:
            if c is not root and id(c) not in folded:
                folded.add(id(c))
                _fold(root, c)

    nan = next((f for f in findings if f.kind == Kind.NONFINITE.value and f.severity == Severity.CRITICAL.value), None)
    if nan is not None and nan.step is not None:
        claim(nan, [f for f in findings if f.kind in _AFTER_NAN and f.step is not None and f.step >= nan.step])

    # Only a layer (nearly) all dead cuts the path back; 60 % dead still passes gradient through the rest.
    dead = sorted((f for f in findings if f.kind == Kind.DEAD_RELU.value and f.severity == Severity.CRITICAL.value),
                  key=lambda f: rank[id(f)])
    for d in dead:
        # Layers before it, and any layer whose gradient is exactly zero (the cut itself: the weights that
        # feed the dead units get no gradient, wherever a shared ReLU module first ran).
        claim(d, [f for f in findings if f.kind == Kind.VANISHING_GRADIENT.value and id(f) not in folded
                  and (rank[id(f)] < rank[id(d)] or f.evidence.get("grad_norm") == 0.0)
                  and f.step is not None and d.step is not None and f.step >= d.step])

    # Updates that blew up only after the loss had diverged (bad data, a NaN-free numerical fault) follow
    # from it: the loss is their root.
    div = next((f for f in findings if f.kind == Kind.LOSS_DIVERGENCE.value and _loud(f)), None)
    if div is not None and div.step is not None:
        claim(div, [f for f in findings if _too_large(f) and f.step is not None and f.step > div.step
                    and id(f) not in folded])
    # The learning rate's ruin: the first too-large step (else the loss's divergence) is the root.
    big = sorted((f for f in findings if _too_large(f) and id(f) not in folded), key=lambda f: (f.step or 0, rank[id(f)]))
    lr_root = big[0] if big else div
    if lr_root is not None and lr_root.step is not None:
        claim(lr_root, [f for f in findings if f.kind == Kind.VANISHING_GRADIENT.value and f.step is not None
                        and f.step >= lr_root.step and id(f) not in folded])

    vanishing = {f.layer: f for f in findings if f.kind == Kind.VANISHING_GRADIENT.value and id(f) not in folded}
    for f in findings:
        v = vanishing.get(f.layer)
        if v is not None and f.kind == Kind.UPDATE_RATIO.value and not _too_large(f) and id(f) not in folded:
            claim(v, [f])
    return [f for f in findings if id(f) not in folded]
