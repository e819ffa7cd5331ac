"""Special-module tables: how each kind of module is treated. One comment per entry, no scattered isinstance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..distributed import is_sharded, local

# Modules whose output is exactly zero for "off" units: dead-unit detection is meaningful on them.
RELU_LIKE: tuple[type[nn.Module], ...] = (
    nn.ReLU,  # the classic: zero for negative input
    nn.ReLU6,  # clipped ReLU; zero below 0 as well
)
# Not relu-like although they output exact zeros: Hardshrink/Softshrink zero only a band around 0 and pass
# negative values through (a unit with negative outputs is alive), Threshold replaces with any value.
ZERO_BAND: tuple[type[nn.Module], ...] = (nn.Hardshrink, nn.Softshrink, nn.Threshold)

# Class-name endings of user-written normalization layers (nanoGPT's LayerNorm, Hugging Face's LlamaRMSNorm,
# T5LayerNorm, ...): recognised as norms by structure, see is_custom_norm().
NORM_NAME_ENDINGS: tuple[str, ...] = ("Norm", "LayerNorm", "RMSNorm", "Normalization")

# Saturating functions and the output bands that count as their "flat tails": where the derivative is
# below ~5 % of its maximum (sigmoid: s(1-s) < 0.0125; tanh: 1 - t^2 < 0.05).
SATURATION_BANDS: dict[type[nn.Module], tuple[float, float]] = {
    nn.Sigmoid: (0.0127, 0.9873),
    nn.Tanh: (-0.9747, 0.9747),
    nn.Hardtanh: (-1.0, 1.0),  # exactly at min/max the derivative is zero (default bounds; see band_for)
    nn.Hardsigmoid: (0.0, 1.0),  # flat outside (-3, 3): output exactly 0 or 1
    nn.Softsign: (-0.8, 0.8),  # derivative (1-|y|)^2 < 0.04 beyond |y| > 0.8
}

# Normalization layers: their input is compared with running statistics, their gain watched for collapse.
NORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
        nn.LazyBatchNorm1d,
        nn.LazyBatchNorm2d,
        nn.LazyBatchNorm3d,
    )
    if t is not None
)

# Norm layers that normalize over dim 1 per channel (and so have per-channel batch statistics).
CHANNEL_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)

# Elementwise modules: their output has the same layout as their input, so they inherit the unit axis
# (dim 1 after a conv, last dim after a linear) of the tensor they were given.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    *RELU_LIKE,
    *ZERO_BAND,
    *SATURATION_BANDS,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)

# Modules whose outputs are channels-first (N, C, ...): the unit axis is dim 1 even for 3-D outputs.
CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

# Dropout zeroes outputs at random per sample: dead-unit masks are meaningless on it.
NO_DEAD_UNITS: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)


def role_of(module: nn.Module) -> str:
    """The analyzer-facing role of a module: relu, saturating, norm, dropout, container or other."""
    if isinstance(module, RELU_LIKE):
        return "relu"
    if type(module) in SATURATION_BANDS or isinstance(module, tuple(SATURATION_BANDS)):
        return "saturating"
    if isinstance(module, NORM_LAYERS) or is_custom_norm(module):
        return "norm"
    if isinstance(module, NO_DEAD_UNITS):
        return "dropout"
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.modules.rnn.RNNBase):
        return "recurrent"
    if len(module._modules) > 0:
        return "container"
    return "other"


def is_custom_norm(module: nn.Module) -> bool:
    """A user-written normalization layer: a leaf module whose class name ends like a norm's and whose
    parameters are a 1-D gain ``weight`` (and maybe a 1-D ``bias``), as LayerNorm/RMSNorm re-implementations are."""
    if module._modules or not type(module).__name__.endswith(NORM_NAME_ENDINGS):
        return False
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    return set(params) <= {"weight", "bias"} and all(p.dim() == 1 for p in params.values())


def band_for(module: nn.Module) -> tuple[float, float] | None:
    """The saturation band of a module, using its own bounds where it has them (Hardtanh(min, max))."""
    if isinstance(module, nn.Hardtanh):  # includes ReLU6, but that one is relu-like first
        return (float(module.min_val), float(module.max_val))
    for t, band in SATURATION_BANDS.items():
        if isinstance(module, t):
            return band
    return None


def unit_dim(module: nn.Module, ndim: int, inherited: int | None) -> int | None:
    """The axis holding a module's units, or None when the output has no unit axis (a scalar)."""
    if ndim < 2:
        return None
    if ndim >= 4:
        return 1
    if isinstance(module, CHANNELS_FIRST):
        return 1
    if isinstance(module, ELEMENTWISE) and inherited is not None:
        return inherited
    return ndim - 1


# --- which tensors are measured --------------------------------------------------------------------
# Every kind of tensor a module can return, and what gradscope does with it, checked in this order. A
# skipped kind is skipped on purpose, with the reason the report's tables and tests can show.
SKIPPED_KINDS: tuple[tuple[str, Callable[[torch.Tensor], bool], str], ...] = (
    ("meta", lambda t: t.is_meta, "a meta tensor has a shape but no values"),
    ("nested", lambda t: t.is_nested, "a nested tensor's ragged parts have no single layout to reduce"),
    ("quantized", lambda t: t.is_quantized, "quantized values are integers with a scale, not activations"),
    ("sparse", lambda t: t.layout != torch.strided, "a sparse tensor's stored values are not its distribution"),
    ("complex", lambda t: t.is_complex(), "complex values have no order: min/max/saturation do not apply"),
    ("integer or bool", lambda t: not t.is_floating_point(), "indices, masks and counts are not activations"),
    ("empty", lambda t: t.numel() == 0, "no elements (an expert with no tokens, a zero-width output)"),
)
# Measured kinds: floating, strided, non-empty tensors (inference-mode ones too: they are only read,
# every statistic is a new tensor and accumulation is out of place); a DTensor is reduced locally, as
# this rank's shard, which the distributed combiner adds up across ranks.


def skip_reason(t: torch.Tensor) -> str | None:
    """Why a tensor is not reduced (one line), or None when it is measured."""
    for kind, test, why in SKIPPED_KINDS:
        if test(t):
            return f"{kind}: {why}"
    return None


def measurable(t: object) -> torch.Tensor | None:
    """The tensor to reduce for a module output or gradient (a DTensor's local shard), or None."""
    if not isinstance(t, torch.Tensor):
        return None
    if is_sharded(t):
        t = local(t)
    return t if skip_reason(t) is None else None
