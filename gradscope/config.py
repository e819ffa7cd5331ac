"""Analyzer thresholds and collection settings. Every default is documented in docs/findings.md."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import UsageError

#: Default sampling period: statistics are collected on every N-th training step. Chosen so that the
#: collection cost (measured in benchmarks/README.md) is spread to about 1 % of plain training.
DEFAULT_EVERY = 10

#: Collected steps kept in the bounded history ring (memory does not grow with training length).
DEFAULT_HISTORY = 256


@dataclass
class Thresholds:
    """Thresholds of every analyzer. Override any of them: ``gradscope.Thresholds(dead_warning=0.3)``."""

    # --- gradients -------------------------------------------------------------------------------
    #: A layer's gradient norm / weight norm below this, sustained, is vanishing (absolute rule).
    vanishing_ratio: float = 1e-7
    #: Earliest layers' gradient norm below this fraction of the last layers' is vanishing (depth rule).
    vanishing_depth_ratio: float = 1e-4
    #: A layer's gradient norm / weight norm above this is exploding.
    exploding_ratio: float = 1e3
    #: Gradient norm growing by more than this factor over the window (sustained) is exploding.
    exploding_growth: float = 1e3
    #: Share of collected steps over which a symptom must hold to be "sustained".
    sustained_fraction: float = 0.6
    #: Depth rule: below this fraction of the later layers' relative gradient it is critical, not a warning.
    vanishing_depth_critical: float = 1e-6
    #: A layer "is not moving" when its relative update is below this fraction of the fastest later layer's.
    vanishing_update_gap: float = 1e-2
    #: A layer's relative gradient this many times the later layers' median (sustained) is exploding.
    exploding_depth_ratio: float = 1e4
    #: The loss "is improving" when its late mean is below its early mean by at least this fraction.
    loss_plateau: float = 0.05

    # --- activations -----------------------------------------------------------------------------
    #: Share of a layer's units dead over the window: warning at/above, critical at/above.
    dead_warning: float = 0.5
    dead_critical: float = 0.9
    #: Share of outputs in the flat tails of a saturating function: warning at/above.
    saturation_warning: float = 0.5
    saturation_critical: float = 0.9
    #: Recent collected steps over which dead units (never non-zero) and saturation are judged.
    activation_window: int = 20
    #: Samples per unit that must be seen over that window before a unit can be called dead.
    dead_min_samples: int = 32

    # --- normalization ---------------------------------------------------------------------------
    #: |batch mean - running mean| / running std above this is drift.
    norm_mean_gap: float = 3.0
    #: |log(batch var / running var)| above this is drift (log(10) ~ 2.3).
    norm_log_var_ratio: float = 2.3
    #: Running variance below this is "near zero".
    norm_min_running_var: float = 1e-6
    #: Affine gain RMS below this is collapsed, above the other is exploding.
    norm_gain_collapse: float = 1e-3
    norm_gain_explode: float = 1e3
    #: Norm-layer input RMS growing by more than this factor over training.
    norm_input_growth: float = 1e3
    #: Training steps before running statistics are judged: BatchNorm's running stats lag early by design.
    norm_warmup_steps: int = 30

    # --- optimizer -------------------------------------------------------------------------------
    #: ||dw|| / ||w|| per step: above is too large (warning / critical), below is too small.
    update_ratio_high: float = 1e-1
    update_ratio_critical: float = 1.0
    update_ratio_low: float = 1e-7
    #: Loss above this multiple of its recent range is a spike.
    loss_spike: float = 10.0
    #: Loss rising by more than this factor from its running minimum over the window is divergence.
    loss_rise: float = 3.0

    # --- numerics --------------------------------------------------------------------------------
    #: Optimizer steps skipped for non-finite gradients (GradScaler) tolerated before it is a finding.
    skipped_steps_persist: int = 5

    # --- history ---------------------------------------------------------------------------------
    #: Minimum collected steps before trend rules (growth, sustained) are judged.
    min_steps: int = 3

    # --- checkpoint --------------------------------------------------------------------------------
    # Weight-only rules of `gradscope inspect` (docs/inspect.md). They also use norm_min_running_var,
    # norm_gain_collapse, norm_gain_explode and dead_warning above.
    #: A weight whose RMS is this many times above (or below) the median of its same-shaped siblings.
    ckpt_outlier_ratio: float = 100.0
    #: A unit is dead by its bias when -bias exceeds this many times the largest pre-activation that
    #: inputs of its peers' scale can give (|w|·|x|, with |x| ≥ sqrt(fan_in)).
    ckpt_dead_bias_margin: float = 10.0
    #: BatchNorm running_var above this is "huge".
    ckpt_running_var_huge: float = 1e6
    #: BatchNorm |running_mean| / sqrt(running_var) above this is far from zero.
    ckpt_norm_mean_ratio: float = 100.0
    #: Weights with fewer elements are too small to recognise PyTorch's default initialization in.
    ckpt_fingerprint_min_numel: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"Thresholds.{f.name} must be a number, got {value!r}")
            if value < 0:
                raise UsageError(f"Thresholds.{f.name} must be >= 0, got {value!r}")
        if self.dead_critical < self.dead_warning:
            raise UsageError("Thresholds.dead_critical must be >= dead_warning")
