"""Parameter analyzer: ``unused_parameter`` and ``not_in_optimizer``.

- unused_parameter: ``requires_grad=True`` and never a gradient on any collected step of the run
  (History keeps the set run-long). Frozen parameters are never reported. Judged only after
  ``min_steps`` collected steps with parameter statistics, so a branch used now and then is not
  mistaken for dead weight after one step.
- not_in_optimizer: receives gradients but is in no param group of the watched optimizer(s); only when
  an optimizer was watched. Critical when the weights indeed never moved (nothing else updates them),
  a warning when they moved anyway (a hand-written update, an EMA).

Findings are grouped per owning module, as the contract keys findings by layer.
"""

from __future__ import annotations

import math

from ..config import Thresholds
from ..findings import Finding, Kind, Severity
from ..stats.history import History


def analyze(history: History, thresholds: Thresholds) -> list[Finding]:
    seen = [r for r in history.records if r.params]
    if not seen:
        return []
    return [*_unused(history, len(seen), thresholds), *_not_in_optimizer(history)]


def _by_layer(history: History, names: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(history.params[n].layer, []).append(n)
    return groups


_SINGULAR = {
    "receive": "receives",
    "require": "requires",
    "are": "is",
    "they never train": "it never trains",
    "the optimizer never updates them": "the optimizer never updates it",
}


def verb(plural: str, names: list[str]) -> str:
    """The plural phrase for several parameters, its singular for one ("fc2.weight receives ...")."""
    return plural if len(names) > 1 else _SINGULAR[plural]


def _first_step(history: History) -> int | None:
    return history.first.step if history.first is not None else None


def _unused(history: History, collected: int, th: Thresholds) -> list[Finding]:
    if collected < th.min_steps:
        return []
    unused = [n for n, p in history.params.items() if p.requires_grad and n not in history.ever_grad]
    found: list[Finding] = []
    for layer, names in _by_layer(history, unused).items():
        numel = sum(history.params[n].numel for n in names)
        listed = ", ".join(names)
        found.append(
            Finding(
                kind=Kind.UNUSED_PARAMETER.value,
                severity=Severity.WARNING.value,
                layer=layer,
                step=_first_step(history),
                message=(
                    f"{listed} ({numel} values) {verb('require', names)} gradients but "
                    f"never received one in "
                    f"{collected} collected steps."
                ),
                hint=(
                    "Use the module in forward(), delete it, or freeze it with requires_grad_(False); "
                    "DistributedDataParallel also needs find_unused_parameters=True for it."
                ),
                evidence={"params": listed, "numel": numel, "collected_steps": collected},
            )
        )
    return found


def _moved(history: History, name: str) -> bool | None:
    """Did the weight norm change over the run? None when it cannot be told."""
    first = history.first.params.get(name) if history.first is not None else None
    last = history.last.params.get(name) if history.last is not None else None
    if first is None or last is None or history.first is history.last:
        return None
    if not (math.isfinite(first.weight_norm) and math.isfinite(last.weight_norm)):
        return True
    ups = [r.params[name].update_norm for r in history.records if name in r.params]
    if any(u is not None and u > 0 for u in ups):
        return True
    return first.weight_norm != last.weight_norm


def _not_in_optimizer(history: History) -> list[Finding]:
    if not history.has_optimizer:
        return []
    outside = [
        n
        for n, p in history.params.items()
        if p.requires_grad and p.in_optimizer is False and n in history.ever_grad
    ]
    found: list[Finding] = []
    for layer, names in _by_layer(history, outside).items():
        moved = [_moved(history, n) for n in names]
        frozen = not any(m is True for m in moved)
        listed = ", ".join(names)
        numel = sum(history.params[n].numel for n in names)
        found.append(
            Finding(
                kind=Kind.NOT_IN_OPTIMIZER.value,
                severity=(Severity.CRITICAL if frozen else Severity.WARNING).value,
                layer=layer,
                step=_first_step(history),
                message=(
                    f"{listed} {verb('receive', names)} gradients but {verb('are', names)} in no param group "
                    f"of the optimizer, so "
                    f"{verb('they never train', names) if frozen else verb('the optimizer never updates them', names)}."
                ),
                hint=(
                    "Build the optimizer from model.parameters() (or add a param group for this layer), "
                    "or freeze these parameters with requires_grad_(False) if that is intended."
                ),
                evidence={"params": listed, "numel": numel, "weights_moved": int(not frozen)},
            )
        )
    return found
