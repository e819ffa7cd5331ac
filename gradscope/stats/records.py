"""Host-side records of collected statistics: what analyzers read and reporters render.

One :class:`StepRecord` per collected training step. Everything here is plain Python numbers (and
small numpy masks), so analyzers can be tested with hand-built records and no model at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerInfo:
    """Static facts about one watched module."""

    name: str  # qualified name as in model.named_modules(); "" is the root module
    type: str  # class name, e.g. "Linear"
    role: str = "other"  # from hooks/selection.py: "relu", "saturating", "norm", "dropout", "other", ...
    order: int = -1  # first forward-execution index in a training step; -1 if never seen running
    params: list[str] = field(default_factory=list)  # full names of parameters it owns directly
    saturation: tuple[float, float] | None = None  # (low, high) flat-tail bands for saturating modules


@dataclass
class ParamInfo:
    """Static facts about one parameter."""

    name: str  # full name as in model.named_parameters()
    layer: str  # owning module's qualified name
    shape: tuple[int, ...]
    numel: int
    dtype: str
    requires_grad: bool = True
    in_optimizer: bool | None = None  # None when no optimizer is watched
    group: int | None = None  # index of its param group (across all watched optimizers)


@dataclass
class ActivationStats:
    """A module's forward outputs on one collected step (all tensor outputs, all calls, summed)."""

    numel: int
    mean: float
    std: float
    rms: float
    absmax: float
    zero_frac: float  # share of elements exactly zero
    neg_frac: float  # share of elements < 0
    # Non-finite counts. The total is exact; when NaN and Inf are both present all are counted as NaN
    # (telling them apart would cost a pass per output on every collected step).
    nan: int
    inf: int
    saturated_frac: float | None = None  # only for modules with a saturation band
    calls: int = 1
    # Per unit (dim 1 for conv-shaped outputs, last dim otherwise): True if the unit was non-zero for
    # at least one sample this step. None when the output has no unit axis.
    alive: np.ndarray | None = None
    # One ReLU-like module applied at several widths in a step (a shared ``self.relu``): alive masks per
    # width, so no mask is dropped. None when the module saw a single width (then ``alive`` holds it).
    alive_by_width: dict[int, np.ndarray] | None = None
    # Weighted layers (Linear/Conv): per-unit largest raw output value. A unit whose pre-activation is
    # never positive is dead behind any rectifier, a functional ``F.relu`` included.
    unit_max: np.ndarray | None = None
    # A strided sample of output values (at most 1024), only when watch(histograms=True).
    sample: np.ndarray | None = None

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf


@dataclass
class GradStats:
    """Gradient with respect to a module's outputs on one collected step (all backward passes summed)."""

    norm: float  # L2 norm over all output gradients of the step: sqrt of the summed squares
    absmax: float
    nan: int
    inf: int
    order: int  # index of this module's first gradient in the step's backward order (0 = first)
    # Weighted layers (Linear/Conv): per-unit largest |gradient of the output|; exactly zero for units
    # that a rectifier after them never let through.
    unit_absmax: np.ndarray | None = None
    sample: np.ndarray | None = None  # strided sample of gradient values, only with histograms=True

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf


@dataclass
class ParamStats:
    """One parameter on one collected step, read when the optimizer steps (or at scope.step())."""

    grad_norm: float | None  # None: no gradient arrived this step
    weight_norm: float
    grad_nonfinite: bool = False
    weight_nonfinite: bool = False
    update_norm: float | None = None  # ||w_after - w_before|| of this step's optimizer update
    lr: float | None = None  # learning rate of its param group at this step
    # Adam-family: RMS of the effective per-element step lr / (sqrt(v_hat) + eps), if available.
    adam_step_rms: float | None = None
    # requires_grad was False at this step (a block frozen mid-run): no gradient is expected, none is missing.
    frozen: bool = False
    # grad_norm is the gradient as backward produced it (before the user's clipping, unscaled) when the
    # pre-clip hooks ran (hooks/param_grads.py); this is the norm the optimizer then received.
    grad_norm_clipped: float | None = None

    @property
    def grad_to_weight(self) -> float | None:
        if self.grad_norm is None:
            return None
        return self.grad_norm / self.weight_norm if self.weight_norm > 0 else float("inf")

    @property
    def update_to_weight(self) -> float | None:
        if self.update_norm is None:
            return None
        return self.update_norm / self.weight_norm if self.weight_norm > 0 else float("inf")


@dataclass
class NormStats:
    """A normalization layer's input compared with its running statistics (where it has them)."""

    training: bool  # observed in a training forward (True) or an evaluation forward (False)
    input_rms: float
    # Per-channel gaps, reduced to their worst (max) and typical (mean) value. NaN without running stats.
    mean_gap_max: float = float("nan")  # |batch_mean - running_mean| / sqrt(running_var + eps)
    mean_gap_mean: float = float("nan")
    log_var_ratio_max: float = float("nan")  # |log((batch_var + eps) / (running_var + eps))|
    log_var_ratio_mean: float = float("nan")
    running_var_min: float = float("nan")
    weight_rms: float | None = None  # affine gain RMS
    bias_rms: float | None = None
    # The worst channels of the gain: its smallest and largest |weight| (one collapsed or exploded channel
    # hides in the RMS of a wide layer).
    weight_absmin: float | None = None
    weight_absmax: float | None = None
    calls: int = 1


@dataclass
class InputStats:
    """Whether what came into a module was finite, on one collected step (hooks/backward.py)."""

    nonfinite: bool | None = None  # its floating inputs in forward held NaN/Inf (None: not seen)
    grad_nonfinite: bool | None = None  # the gradient it passed back to its inputs held NaN/Inf
    grad_order: int = -1  # index of its first input gradient in the step's backward (0 = first)


@dataclass
class StepRecord:
    """Everything collected on one training step."""

    step: int
    loss: float | None = None
    activations: dict[str, ActivationStats] = field(default_factory=dict)  # by layer
    gradients: dict[str, GradStats] = field(default_factory=dict)  # by layer
    params: dict[str, ParamStats] = field(default_factory=dict)  # by parameter name
    norms: dict[str, NormStats] = field(default_factory=dict)  # by layer, training forwards
    eval_norms: dict[str, NormStats] = field(default_factory=dict)  # by layer, eval forwards since last record
    lrs: list[float] = field(default_factory=list)  # per param group, across watched optimizers
    skipped: bool = False  # the optimizer did not apply this step (e.g. GradScaler found inf/NaN)
    inputs: dict[str, InputStats] = field(default_factory=dict)  # by layer: finiteness of what came in
    # Global gradient norm as backward produced it / as the optimizer received it (> 1: the user clipped).
    clip_ratio: float | None = None
