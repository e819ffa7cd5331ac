"""``gradscope demo``: small models, healthy and broken, trained on synthetic data with gradscope watching.

Each scenario (:mod:`.scenarios`) is a small model with one known problem (or none), trained for a few
dozen steps. Nothing is downloaded. This package computes; ``gradscope_cli.demo_cmd`` shows.

- data.py: seeded synthetic datasets; models.py: the small models; training.py: the loop and Scenario;
- scenarios.py: the demo's scenarios and the finding each one shows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..findings import Report
from ..scope import watch
from .scenarios import SCENARIOS, build
from .training import Scenario

__all__ = ["DEMO", "SCENARIOS", "Result", "Scenario", "build", "run_demo", "run_scenario"]

#: The demo's scenarios, in the order shown: the healthy control first, then one per problem.
DEMO: tuple[str, ...] = (
    "healthy_mlp",
    "vanishing_sigmoid",
    "dead_relu",
    "exploding_lr",
    "bn_eval_shift",
    "nan_source",
    "not_in_optimizer",
    "saturated_tanh",
    "unused_parameter",
)

#: Collect every step: the runs are a few dozen steps long, and the dashboards should show each one.
EVERY = 1


@dataclass
class Result:
    name: str  # the scenario, and the TensorBoard run name: DIR/<name>
    why: str  # one line: what is wrong with it (or that nothing is)
    expect: tuple[str, str] | None  # (kind, layer) gradscope should report; None for a healthy control
    report: Report
    summary: dict[str, Any]
    seconds: float
    log_dir: str | None

    @property
    def caught(self) -> bool:
        """The expected kind at the expected layer; for a healthy control, nothing above info."""
        if self.expect is None:
            return all(f.severity == "info" for f in self.report.findings)
        kind, layer = self.expect
        return any(f.kind == kind and f.layer == layer for f in self.report.findings)


def run_scenario(name: str, log_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Result:
    """Train one scenario with gradscope watching; TensorBoard logs go to ``log_dir`` when given."""
    sc = build(name, seed)
    start = time.perf_counter()
    with watch(sc.model, sc.optimizer, log_dir=log_dir, every=EVERY) as scope:
        sc.run(scope)
        report = scope.report()
        summary = scope.summary()
    return Result(sc.name, sc.why, sc.expect, report, summary, time.perf_counter() - start,
                  os.fspath(log_dir) if log_dir is not None else None)


def run_demo(
    log_dir: str | os.PathLike[str] | None,
    names: list[str] | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run the scenarios (all of DEMO, or those named) in order; logs under ``log_dir/<scenario>``."""
    results = []
    for name in names or DEMO:
        result = run_scenario(name, Path(log_dir) / name if log_dir is not None else None)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
