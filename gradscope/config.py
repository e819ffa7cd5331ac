"""Analyzer thresholds and collection settings. Every default is documented in docs/findings.md."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from .errors import UsageError
from .schedule import Schedule, schedule_for  # noqa: F401  (re-exported: imports from config keep working)

#: ``watch(every=None)``, the default: the schedule of schedule.py, chosen from the measured cost of a collected
#: step (benchmarks/README.md) so that long runs pay about 1 % and short runs still get enough samples.
DEFAULT_EVERY = None

#: Collected steps kept in the bounded history ring (memory does not grow with training length).
DEFAULT_HISTORY = 256


def validate_options(every: object, thresholds: object, log_dir: object) -> None:
    """The checks watch() and the framework callbacks share, so a typo fails before a long job starts."""
    schedule_for(every)  # type: ignore[arg-type]
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise UsageError(f"thresholds must be a gradscope.Thresholds, got {type(thresholds).__name__}")
    if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
        raise UsageError(f"log_dir must be a path or None, got {type(log_dir).__name__}")


@dataclass
class Thresholds:
    """Thresholds of every analyzer. Override any of them: ``gradscope.Thresholds(dead_warning=0.3)``."""

    # --- gradients -------------------------------------------------------------------------------
    #: A layer's gradient norm / weight norm below this, sustained, is vanishing (absolute rule): five orders
    #: below a healthy start (1e-3..1e-1 measured on the zoo and real architectures); even Adam's eps (1e-8)
    #: starts to dominate such gradients. Stands alone (critical) unless the loss fell 100-fold.
    vanishing_ratio: float = 1e-7
    #: Earliest layers' relative gradient below this fraction of the largest later layer's is vanishing (depth
    #: rule). Healthy nets show 1e-2..1e-1 between first and last layer; the zoo's deep sigmoid MLP 5e-11; BERT's
    #: queries and keys on its initial plateau 5e-5 (then moving normally under Adam: lowered to info).
    vanishing_depth_ratio: float = 1e-4
    #: A layer's gradient norm / weight norm above this is exploding, whatever the loss does (stands alone):
    #: healthy layers sit at 1e-3..1 (a zero-init layer excepted, see ``exploding_waking_*``); an explosion
    #: Adam hides reaches 1e3..1e5, an RNN exploding through 40 time steps 1e4.
    exploding_ratio: float = 1e3
    #: Gradient norm above this factor x the median of the layer's earlier steps is exploding: an lr raised
    #: 100x grows it 1e4-1e8x within a few steps; healthy gradients change by under 10x over a run.
    exploding_growth: float = 1e3
    #: Share of collected steps over which a symptom must hold to be "sustained": a clear majority, so that
    #: one noisy step in three does not break a real episode and a one-off spike never makes one.
    sustained_fraction: float = 0.6
    #: Depth rule: below this fraction of the later layers' relative gradient it is critical, not a warning
    #: (two orders past the warning line; the zoo's deep sigmoid MLP under SGD measures 5e-11 at fc0).
    vanishing_depth_critical: float = 1e-6
    #: A layer "is not moving" when its relative update is below this fraction of the fastest later layer's:
    #: under SGD the step follows the gradient (a 1e-5 depth gap gives a 1e-5 update gap); under Adam every
    #: layer moves within ~10x of the others whatever its gradient.
    vanishing_update_gap: float = 1e-2
    #: A layer's relative gradient this many times the later layers' median (sustained) is exploding: the
    #: mirror of ``vanishing_depth_ratio`` (healthy depth gaps are within 1e2 either way).
    exploding_depth_ratio: float = 1e4
    #: The user's gradient clipping shrank the global gradient by at least this factor on most collected
    #: steps (``sustained_fraction``): the clip, not the learning rate, sets every step, and it hides an
    #: explosion. A healthy run clipped at 1.0 sees pre-clip norms of ~0.3-10 (ratios under 10); the tanh
    #: RNN of spectral radius 2 (Pascanu et al., 2013) clipped at 1.0 sees 900-5500.
    clip_hidden_ratio: float = 100.0
    #: ... and at least this factor (median over the clipped steps) while the loss does not improve: critical.
    clip_hidden_critical: float = 1e3
    #: The loss "is improving" when its last third's mean is below its first third's by at least this
    #: fraction: above the few % that small-batch noise moves a third's mean (measured over 40 healthy runs).
    loss_plateau: float = 0.05
    #: A relative gradient below this, sustained, while the loss does not improve, is vanishing: with any
    #: learning rate up to 1, SGD's step is then two orders below the healthy ~1e-3 band (as
    #: ``update_ratio_low``). Measured: a 30-layer plain ReLU net with Xavier init sits at 1e-7..1e-6
    #: (He et al., 2015, sec. 2.2), healthy nets at 1e-3..1e-1 at the start.
    vanishing_stuck_ratio: float = 1e-5
    #: A layer whose weight norm grew this many times since first seen is waking up from near zero (its
    #: gradient may be 1e3 x its tiny weights by design): ``exploding_ratio`` does not stand alone there.
    #: Zero-init layers grow by orders of magnitude; healthy initialized layers change by under 2x.
    exploding_waking_growth: float = 10.0
    #: ... and whose weights' RMS when first seen was below this: born near zero. Initialized layers start
    #: at 1/sqrt(fan_in) (>= 1e-2 up to a fan-in of 10^4) or std 0.02; a zero-init layer after a few steps
    #: of lr 1e-3 is near 1e-3 or below. A layer that grew 70x because an explosion blew it up is not waking.
    exploding_waking_rms: float = 1e-3
    #: Gradients summed over steps (zero_grad() never called) grow on most steps: this share of
    #: step-over-step increases over the collected steps ...
    exploding_steady_share: float = 0.6
    #: ... by at least this factor from the first collected step to the late third's median (nanoGPT
    #: without zero_grad: 1.1 -> 150 at the embedding; a small GPT: 0.13 -> 2.1 at c_attn over 200 steps) ...
    exploding_steady_growth: float = 10.0
    #: ... while the loss does not improve, or its level (trimmed mean of ``loss_window`` losses) sits this
    #: factor above its low (nanoGPT without zero_grad: 3.56 -> 5.33, 1.5x; the small-batch noise of a
    #: 20-loss level is a few %).
    loss_level_rise: float = 1.2

    # --- activations -----------------------------------------------------------------------------
    #: Share of a layer's units dead over the window: warning at/above, critical at/above. Healthy ReLU
    #: nets keep dead units to a few % (the OR over the window revives ordinary sparsity); half dead halves
    #: the layer's capacity, 90 % all but cuts the path back (the roots fold treats it as a cut).
    dead_warning: float = 0.5
    dead_critical: float = 0.9
    #: Share of outputs in the flat tails (derivative under ~5 % of its maximum) of a saturating function:
    #: warning at/above, critical at/above; same shares as dead units, for the same reason.
    saturation_warning: float = 0.5
    saturation_critical: float = 0.9
    #: Recent collected steps over which dead units (never non-zero) and saturation are judged: the 200
    #: dense steps of the default schedule's start, long enough for dropout and sparsity to light every unit.
    activation_window: int = 20
    #: Samples per unit that must be seen over that window before a unit can be called dead: with half a
    #: healthy layer's outputs zero per sample, 32 samples leave a 2^-32 chance for an alive unit to look dead.
    dead_min_samples: int = 32

    # --- normalization ---------------------------------------------------------------------------
    #: |batch mean - running mean| / running std above this is drift: three standard deviations; a batch of 8
    #: is ~0.35 off by sampling alone (twice this for the worst channel, see normalization._drifted).
    norm_mean_gap: float = 3.0
    #: |log(batch var / running var)| above this is drift (log(10) ~ 2.3).
    norm_log_var_ratio: float = 2.3
    #: Running variance below this is "near zero": the size of BatchNorm's default eps (1e-5) and below, where
    #: the layer divides by eps instead of the data's spread.
    norm_min_running_var: float = 1e-6
    #: Affine gain RMS below this is collapsed whatever its start (three orders below the usual 1) ...
    norm_gain_collapse: float = 1e-3
    #: ... or below this fraction of the layer's own starting gain RMS: weight decay applied to a gain of 1
    #: shrinks it geometrically (AdamW wd 0.1 at lr 1e-2: x0.37 per 1000 steps); healthy LayerNorm gains
    #: stay within a factor of ~2 of their start.
    norm_gain_collapse_ratio: float = 0.1
    #: Affine gain RMS above this is exploding (three orders above the usual 1).
    norm_gain_explode: float = 1e3
    #: Norm-layer input RMS growing by more than this factor over training: post-norm residual streams grow
    #: ~sqrt(depth) by design, three orders only when nothing bounds them.
    norm_input_growth: float = 1e3
    #: Training steps before running statistics are judged: BatchNorm's running stats lag early by design
    #: (momentum 0.1 forgets the (0, 1) start to 4 % in 30 steps).
    norm_warmup_steps: int = 30

    # --- optimizer -------------------------------------------------------------------------------
    #: ||dw|| / ||w|| per step (healthy is near 1e-3): at/above ``update_ratio_high`` sustained is too large
    #: when the loss does not improve (warning) or diverges (critical).
    update_ratio_high: float = 1e-1
    #: At/above this sustained the weights are rewritten every step: critical (warning if the loss improves).
    update_ratio_critical: float = 1.0
    #: At/below this sustained, rescaled to the peak learning rate seen, while the loss has not improved over
    #: the run, is too small (two orders of magnitude below the healthy band's low end of ~1e-3).
    update_ratio_low: float = 1e-5
    #: Collected steps that make one "sustained" window for update ratios (with sustained_fraction, min_steps):
    #: 100 training steps at the default schedule's every-10th, short enough to date an lr change.
    update_window: int = 10
    #: A loss more than this multiple of its recent range above its recent median is a spike: an order of
    #: magnitude past anything the last ``loss_window`` losses did (docs/optimizer.md, small-batch noise).
    loss_spike: float = 10.0
    #: Losses (one per step given) in the window a spike is compared with and a loss level is taken over:
    #: 20 averages small-batch noise to a few % (40 healthy runs at batch 1-8, docs/optimizer.md).
    loss_window: int = 20
    #: The loss level (trimmed mean of the last ``loss_window`` losses) rising to this factor of its lowest
    #: level over longer windows before it is divergence.
    loss_rise: float = 3.0
    #: A rise or spike must also climb back by this share of what training had gained (first loss minus
    #: minimum), so that noise near a converged minimum is not divergence.
    loss_giveback: float = 0.1
    #: A loss level this many times the run's first loss (positive losses) is divergence whatever its low:
    #: the updates made the model worse than untrained. Measured: nanoGPT at lr 100x without warm-up
    #: 4.57 -> 10.6 by step 7 (a 10-loss level of ~2x), HF GPT-2 at lr 1.0 4.4 -> 42 at step 1; healthy
    #: runs, warm-up or not, stay below their first loss after the first few steps.
    loss_rise_over_start: float = 1.5

    # --- initialization ----------------------------------------------------------------------------
    #: A first loss at least this many times ln(C) (C: the output layer's width) is far above an
    #: uninformed guess. Measured: nanoGPT with init std 1.0: 36.4 = 8x ln(95); a small GPT with std 1.0:
    #: 3.8x; healthy inits start within ~1.1x of ln(C).
    init_loss_ratio: float = 3.0
    #: ... together with an output RMS at least this (an uninformed model's logits are ~1 or below; a
    #: regression with large targets has a large loss but small outputs at initialization).
    init_logit_rms: float = 5.0
    #: Weighted layers' output RMS growing by this factor from the first to the largest at the first step
    #: (a deep MLP with N(0, 1) weights of fan-in 256 multiplies the scale by ~16 per layer; healthy inits
    #: keep it within ~10x across the whole depth).
    init_growth: float = 100.0

    # --- numerics --------------------------------------------------------------------------------
    #: Optimizer steps skipped for non-finite gradients (GradScaler) tolerated before it is a finding:
    #: GradScaler halves its scale per overflow and recovers in one or two steps; five in a row is not that.
    skipped_steps_persist: int = 5

    # --- history ---------------------------------------------------------------------------------
    #: Minimum collected steps before trend rules (growth, sustained) are judged: a trend needs a baseline
    #: and a repetition; three is the fewest a 30-step run gives at the default schedule.
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
