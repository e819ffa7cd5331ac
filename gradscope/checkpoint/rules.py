"""Weight-only rules: what a checkpoint's tensors prove without running the model.

Each rule reads the per-tensor numbers of :mod:`gradscope.checkpoint.weights` and returns Findings with
``step=None``. From weights alone nothing is certain about how the model uses a layer (which activation
follows it, which inputs it sees), so the rules are conservative: ``critical`` only for what breaks any
forward pass (NaN/Inf, a negative running variance), ``info`` for patterns that are also healthy in
some models (zero-initialised layers), ``warning`` otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Thresholds
from ..findings import Finding, Kind, Severity
from .loading import PROGRESS_KEYS
from .weights import TensorStats

# Names of normalization modules when no model says what a module is: "bn1", "ln_f", "norm2",
# "LayerNorm", "input_layernorm", "attn_ln", "q_norm". Only 1-D-gain modules are matched, so a
# Linear called "norm_proj" is never taken for one.
NORM_NAME = re.compile(r"norm|^(ln|bn|gn)(_?\d+|_f)?$|_(ln|bn|gn)$", re.IGNORECASE)

# Names of embedding tables: a zero row there is a padding index, not a dead unit.
EMBED_NAME = re.compile(r"emb|^wte$|^wpe$|^tok|lookup|^shared$", re.IGNORECASE)

# BatchNorm's default eps: what running_var is padded with when the layer normalizes.
BN_EPS = 1e-5

# Buffers that are statistics or counters, never weights a scale outlier could be found in.
STAT_LEAVES = frozenset({"running_mean", "running_var", "num_batches_tracked"})


@dataclass
class Layer:
    """The tensors of one module, by leaf name (``weight``, ``bias``, ``running_var`` ...)."""

    name: str
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    role: str = "other"  # "norm", "batchnorm", "embedding", "linear", "other"


def group_layers(stats: list[TensorStats], roles: Mapping[str, str] | None = None) -> dict[str, Layer]:
    """Group tensors by module, in checkpoint order, and decide each module's role."""
    layers: dict[str, Layer] = {}
    for s in stats:
        layers.setdefault(s.layer, Layer(s.layer)).tensors[s.leaf] = s
    for layer in layers.values():
        layer.role = _role(layer, (roles or {}).get(layer.name))
    return layers


def _role(layer: Layer, known: str | None) -> str:
    t = layer.tensors
    if "running_var" in t:
        return "batchnorm"
    if known in ("norm", "embedding", "linear"):  # from the model (hooks.selection.role_of), when given
        return known
    weight = t.get("weight")
    if weight is None:
        return "other"
    short = layer.name.rpartition(".")[2]
    if len(weight.shape) == 1 and all(len(s.shape) == 1 for s in t.values()) and NORM_NAME.search(short):
        return "norm"
    if len(weight.shape) == 2 and EMBED_NAME.search(short):
        return "embedding"
    return "linear" if len(weight.shape) >= 2 else "other"


def training_evidence(meta: Mapping[str, Any], layers: Mapping[str, Layer]) -> str | None:
    """Why we know the checkpoint comes from training (a step counter, optimizer state), or None."""
    for key in PROGRESS_KEYS:
        value = meta.get(key)
        if isinstance(value, int) and value > 0:
            return f"{key} {value}"
    if meta.get("optimizer_state"):
        return "it holds optimizer state"
    for layer in layers.values():
        nbt = layer.tensors.get("num_batches_tracked")
        if nbt is not None and nbt.values is not None and nbt.values.size and nbt.values[0] > 0:
            return f"{layer.name} tracked {int(nbt.values[0])} batches"
    return None


def analyze(
    stats: list[TensorStats],
    thresholds: Thresholds | None = None,
    meta: Mapping[str, Any] | None = None,
    roles: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Every weight-only rule over one checkpoint's tensor statistics (unsorted)."""
    th = thresholds or Thresholds()
    layers = group_layers(stats, roles)
    trained = training_evidence(meta or {}, layers)
    found: list[Finding] = []
    found += nonfinite(layers)
    found += normalization(layers, th, trained)
    found += dead_units(layers, th)
    found += outliers(layers, th, trained)
    return found


# --- nonfinite ---------------------------------------------------------------------------------------


def nonfinite(layers: Mapping[str, Layer]) -> list[Finding]:
    out = []
    for layer in layers.values():
        bad = [s for s in layer.tensors.values() if not s.finite]
        if not bad:
            continue
        nan, inf = sum(s.nan for s in bad), sum(s.inf for s in bad)
        names = ", ".join(s.leaf for s in bad)
        out.append(Finding(
            Kind.NONFINITE, Severity.CRITICAL, layer.name, None,
            f"{nan} NaN and {inf} Inf values in {names} of "
            f"{_label(layer.name)}: every forward pass through it gives NaN/Inf.",
            "Training diverged before this checkpoint was saved: resume from an earlier one, with a lower "
            "learning rate or gradient clipping (and GradScaler under fp16).",
            {"tensors": names, "nan": nan, "inf": inf, "numel": sum(s.numel for s in bad)},
        ))
    return out


# --- normalization -----------------------------------------------------------------------------------


def normalization(layers: Mapping[str, Layer], th: Thresholds, trained: str | None) -> list[Finding]:
    out = []
    for layer in layers.values():
        if layer.role not in ("norm", "batchnorm") or not all(s.finite for s in layer.tensors.values()):
            continue
        problems = _running_stat_problems(layer, th) + _gain_problems(layer, th, trained)
        if not problems:
            continue
        problems.sort(key=lambda p: -Severity(p[0]).rank)
        evidence: dict[str, float | int | str] = {}
        for p in problems:
            evidence.update(p[3])
        out.append(Finding(
            Kind.NORMALIZATION_DRIFT, problems[0][0], layer.name, None,
            f"{_label(layer.name).capitalize()}: " + "; ".join(p[1] for p in problems) + ".",
            problems[0][2], evidence,
        ))
    return out


Problem = tuple[Severity, str, str, dict[str, float | int | str]]  # severity, what, hint, evidence


def _running_stat_problems(layer: Layer, th: Thresholds) -> list[Problem]:
    var_s, mean_s = layer.tensors.get("running_var"), layer.tensors.get("running_mean")
    if var_s is None or var_s.values is None or not var_s.values.size:
        return []
    var = var_s.values
    n = var.size
    problems: list[Problem] = []
    recompute = ("Recompute the running statistics on representative data (a few forward passes in "
                 "train mode under torch.no_grad()), and check the layer feeding it.")
    if (var < 0).any():
        k = int((var < 0).sum())
        problems.append((Severity.CRITICAL, f"running_var is negative in {k} of {n} channels, so "
                         "normalizing takes the square root of a negative number (NaN outputs)",
                         "The running statistics are corrupt: recompute them on real data.",
                         {"negative_var_channels": k, "channels": n, "running_var_min": float(var.min())}))
    low = (var >= 0) & (var < th.norm_min_running_var)
    if low.any():
        k = int(low.sum())
        problems.append((Severity.WARNING, f"running_var is near zero ({float(var.min()):.3g}) in {k} of {n} "
                         "channels: their inputs were constant, so in eval mode any change in them is "
                         "amplified up to 1/sqrt(eps)", recompute,
                         {"near_zero_var_channels": k, "channels": n, "running_var_min": float(var.min())}))
    if var.max() > th.ckpt_running_var_huge:
        k = int((var > th.ckpt_running_var_huge).sum())
        problems.append((Severity.WARNING, f"running_var is huge ({float(var.max()):.3g}) in {k} of {n} "
                         "channels: the inputs it saw were exploding", recompute,
                         {"huge_var_channels": k, "channels": n, "running_var_max": float(var.max())}))
    if mean_s is not None and mean_s.values is not None and mean_s.values.shape == var.shape:
        ok = var >= th.norm_min_running_var  # near-zero variance is reported above, not twice
        ratio = np.abs(mean_s.values[ok]) / np.sqrt(var[ok] + BN_EPS)
        if ratio.size and ratio.max() > th.ckpt_norm_mean_ratio:
            k = int((ratio > th.ckpt_norm_mean_ratio).sum())
            problems.append((Severity.WARNING, f"running_mean is {float(ratio.max()):.3g} running standard "
                             f"deviations from zero in {k} of {n} channels", recompute,
                             {"mean_over_std_max": float(ratio.max()), "far_mean_channels": k, "channels": n}))
    return problems


def _gain_problems(layer: Layer, th: Thresholds, trained: str | None) -> list[Problem]:
    gain = layer.tensors.get("weight")
    if gain is None or len(gain.shape) != 1 or gain.numel == 0:
        return []
    hint = ("Lower the learning rate or exclude norm gains from weight decay; re-initialize the gain "
            "to 1 if it collapsed.")
    ev: dict[str, float | int | str] = {"gain_rms": gain.rms, "channels": gain.numel}
    if gain.absmax == 0.0:
        nbt = layer.tensors.get("num_batches_tracked")
        fresh = nbt is not None and nbt.values is not None and nbt.values.size and nbt.values[0] == 0
        if layer.role == "batchnorm" and (fresh or trained is None):
            # torchvision's zero_init_residual starts the last BatchNorm of each block at gain 0 on purpose.
            return [(Severity.INFO, "its gain is exactly zero, so it outputs only its bias: expected for a "
                     "zero-initialised residual branch before training, a dead branch after it",
                     "Nothing to do before training; after training, re-initialize the gain to 1.", ev)]
        # RMSNorm (and T5's LayerNorm) has no bias: with a zero gain its output is exactly zero.
        output = "only its bias" if "bias" in layer.tensors else "exactly zero"
        return [(Severity.WARNING, f"its gain is exactly zero, so it outputs {output} (the layer "
                 "passes no signal)", hint, ev)]
    if gain.rms < th.norm_gain_collapse:
        return [(Severity.WARNING, f"its gain collapsed toward zero (RMS {gain.rms:.3g})", hint, ev)]
    if gain.rms > th.norm_gain_explode:
        return [(Severity.WARNING, f"its gain exploded (RMS {gain.rms:.3g})", hint, ev)]
    return []


# --- dead units --------------------------------------------------------------------------------------


def dead_units(layers: Mapping[str, Layer], th: Thresholds) -> list[Finding]:
    """Units whose pre-activation can never be positive: a ReLU after them always outputs zero.

    Two proofs: a row of exact zeros with a bias ≤ 0 (the unit outputs its bias), and a bias so negative
    that even the Cauchy-Schwarz bound |w·x| ≤ |w|·|x| cannot offset it for inputs of the scale its
    peers see, with a margin (``ckpt_dead_bias_margin``). That scale is |x| = sqrt(fan_in) (unit-scale
    inputs, what initialization schemes aim for), or larger when the units with a non-negative bias,
    alive for sure, carry biases that say the inputs are larger (raw pixel values, say).
    """
    out = []
    for layer in layers.values():
        w = layer.tensors.get("weight")
        if layer.role != "linear" or w is None or w.row_norms is None or w.zero_rows is None or not w.finite:
            continue
        if w.absmax == 0.0:
            continue  # an all-zero tensor is reported once, by the outlier rule
        units = w.shape[0]
        b = layer.tensors.get("bias")
        bias = b.values if b is not None and b.values is not None and b.finite else None
        if b is not None and (bias is None or bias.shape != (units,)):
            continue  # units are not rows here (HF Conv1D, ConvTranspose): no proof either way
        bias_v = bias if bias is not None else np.zeros(units)
        zero_dead = w.zero_rows & (bias_v <= 0)
        by_bias = np.zeros(units, dtype=bool)
        if bias is not None:
            norms = w.row_norms
            live = norms > 0
            # How far the unit's hyperplane is from the origin: inputs need at least this norm to activate it.
            distance = np.where(live, -bias_v / np.where(live, norms, 1.0), 0.0)
            alive = live & (bias_v >= 0)
            peers = bias_v[alive] / norms[alive]
            scale = max(math.sqrt(w.fan_in), float(np.median(peers)) if peers.size else 0.0)
            by_bias = live & (bias_v < 0) & (distance > th.ckpt_dead_bias_margin * scale)
        dead = zero_dead | by_bias
        k = int(dead.sum())
        if not k:
            continue
        share = k / units
        sev = Severity.WARNING if share >= th.dead_warning else Severity.INFO
        how = []
        if zero_dead.any():
            how.append(f"{int(zero_dead.sum())} with all-zero weights and a bias ≤ 0")
        if by_bias.any():
            how.append(f"{int(by_bias.sum())} with a bias so negative no input of its peers' scale offsets it")
        out.append(Finding(
            Kind.DEAD_RELU, sev, layer.name, None,
            f"{k} of {units} units of {_label(layer.name)} ({share:.0%}) can never have a positive "
            f"pre-activation ({'; '.join(how)}): a ReLU after them outputs 0 for every input.",
            "Re-initialize these units and lower the learning rate that killed them; LeakyReLU or GELU "
            "keep units from dying for good.",
            {"dead_units": k, "units": units, "dead_frac": share, "zero_rows": int(zero_dead.sum()),
             "negative_bias_units": int(by_bias.sum())},
        ))
    return out


# --- scale outliers ----------------------------------------------------------------------------------


def outliers(layers: Mapping[str, Layer], th: Thresholds, trained: str | None) -> list[Finding]:
    candidates = [s for layer in layers.values() if layer.role not in ("norm", "batchnorm")
                  for s in layer.tensors.values()
                  if s.leaf.endswith("weight") and s.leaf not in STAT_LEAVES and s.finite and s.numel > 1]
    return _zero_tensors(candidates, trained) + _sibling_outliers(candidates, th) + \
        _untrained(candidates, layers, th, trained)


def _zero_tensors(candidates: list[TensorStats], trained: str | None) -> list[Finding]:
    out = []
    for s in candidates:
        if len(s.shape) < 2 or s.absmax != 0.0:
            continue
        why = f" although the checkpoint was trained ({trained})" if trained else ""
        out.append(Finding(
            Kind.WEIGHT_OUTLIER, Severity.WARNING if trained else Severity.INFO, s.layer, None,
            f"{s.name} is all exact zeros ({s.numel} values){why}: fine for a zero-initialised layer "
            "before training (residual output projections, LoRA B), otherwise it passes no signal.",
            "If this layer should have trained, check that it is in the optimizer and receives gradients.",
            {"tensor": s.name, "numel": s.numel, "zero_fraction": 1.0},
        ))
    return out


def sibling_pattern(name: str) -> str:
    """"h.*.mlp.fc.weight" for "h.3.mlp.fc.weight": repeated blocks share a pattern."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _sibling_outliers(candidates: list[TensorStats], th: Thresholds) -> list[Finding]:
    scaled = [s for s in candidates if s.rms > 0 and s.numel >= 16]
    by_pattern: dict[tuple[Any, ...], list[TensorStats]] = {}
    by_leaf: dict[tuple[Any, ...], list[TensorStats]] = {}
    for s in scaled:
        by_pattern.setdefault((sibling_pattern(s.name), s.shape), []).append(s)
        if len(s.shape) >= 2:
            by_leaf.setdefault((s.leaf, s.shape), []).append(s)
    out = []
    for s in scaled:
        group = by_pattern[(sibling_pattern(s.name), s.shape)]
        if len(group) < 3:
            group = by_leaf.get((s.leaf, s.shape), [])
        if len(group) < 3:
            continue
        median = float(np.median([g.rms for g in group]))
        ratio = s.rms / median
        if 1 / th.ckpt_outlier_ratio < ratio < th.ckpt_outlier_ratio:
            continue
        direction = f"{ratio:.3g}× above" if ratio > 1 else f"{1 / ratio:.3g}× below"
        out.append(Finding(
            Kind.WEIGHT_OUTLIER, Severity.WARNING, s.layer, None,
            f"The RMS of {s.name} ({s.rms:.3g}) is {direction} the median of its {len(group) - 1} "
            f"same-shaped siblings ({median:.3g}).",
            "Look for what treats this layer differently (its learning rate, weight decay, initialization, "
            "a loading bug); scale outliers usually mean exploding or collapsed weights.",
            {"tensor": s.name, "rms": s.rms, "sibling_median_rms": median, "ratio": ratio,
             "siblings": len(group) - 1},
        ))
    return out


def looks_default_init(s: TensorStats, min_numel: int) -> bool:
    """True if ``s`` is exactly as PyTorch's default Linear/Conv init left it: U(-b, b), b = 1/sqrt(fan_in).

    All |w| ≤ b, the largest within a few 1/n of b (P(miss) < e^-30), and the RMS b/sqrt(3) within six
    standard errors (0.45/sqrt(n) relative for a uniform sample). Training moves the extreme values past
    b, so a trained tensor almost never passes.
    """
    if len(s.shape) < 2 or s.numel < min_numel or not s.finite or s.fan_in == 0:
        return False
    bound = 1.0 / math.sqrt(s.fan_in)
    rounding = 1e-2 if s.dtype in ("float16", "bfloat16") else 1e-5
    if not bound * (1 - 30 / s.numel - rounding) <= s.absmax <= bound * (1 + rounding):
        return False
    return abs(s.rms * math.sqrt(3) / bound - 1) <= max(2.7 / math.sqrt(s.numel), rounding)


def _untrained(candidates: list[TensorStats], layers: Mapping[str, Layer], th: Thresholds,
               trained: str | None) -> list[Finding]:
    eligible = [s for s in candidates if len(s.shape) >= 2 and s.absmax > 0
                and layers[s.layer].role == "linear" and s.numel >= th.ckpt_fingerprint_min_numel]
    fresh = [s for s in eligible if looks_default_init(s, th.ckpt_fingerprint_min_numel)]
    others = len(eligible) - len(fresh)
    if not fresh or others < len(fresh):
        return []  # nothing looks trained next to them: a freshly initialised model, not a finding
    why = f" although the checkpoint was trained ({trained})" if trained else ""
    out = []
    for s in fresh:
        bound = 1.0 / math.sqrt(s.fan_in)
        out.append(Finding(
            Kind.WEIGHT_OUTLIER, Severity.WARNING if trained else Severity.INFO, s.layer, None,
            f"{s.name} looks untrained{why}: it is exactly PyTorch's default initialization (all values "
            f"within ±{bound:.3g}, RMS {s.rms:.3g}), while {others} of the other "
            f"{len(eligible) - 1} weight tensors are not.",
            "Check that this layer's parameters are in the optimizer, have requires_grad=True and are used "
            "in forward (or that the right checkpoint was loaded into it).",
            {"tensor": s.name, "rms": s.rms, "abs_max": s.absmax, "init_bound": bound, "fan_in": s.fan_in},
        ))
    return out


# --- wording -----------------------------------------------------------------------------------------


def _label(layer: str) -> str:
    return f"layer {layer}" if layer else "the model's root module"
