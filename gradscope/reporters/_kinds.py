"""Which statistic shows each finding kind: one table shared by the terminal and TensorBoard reporters.

The statistic names are the TensorBoard tag prefixes (``grad_norm/<layer>``) and the terminal's
column keys, so a finding can be pointed at the curve or the cell that shows it.
"""

from __future__ import annotations

KIND_STATS: dict[str, tuple[str, ...]] = {
    "vanishing_gradient": ("grad_norm",),  # the output-gradient norm falls off
    "exploding_gradient": ("grad_norm",),  # the output-gradient norm blows up
    "dead_relu": ("dead_frac",),  # share of units that never fire
    "saturated_activation": ("saturated_frac",),  # share of outputs in the flat tails
    "normalization_drift": ("norm_drift",),  # batch vs running statistics gap
    "nonfinite": ("grad_norm", "act_rms"),  # NaN/Inf shows in either flow direction
    "unused_parameter": ("param_grad_norm",),  # a flat zero: no gradient ever arrives
    "not_in_optimizer": ("update_ratio", "param_grad_norm"),  # gradient arrives, no update follows
    "update_ratio": ("update_ratio",),  # ||dw|| / ||w|| per step
    "loss_divergence": ("loss",),  # about the model as a whole
    "weight_outlier": ("weight_norm",),  # checkpoint analysis: weight scale
    "init_scale": ("act_rms",),  # outputs growing layer over layer from the first step
}

# Per-layer statistics the TensorBoard reporter writes, in the order the dashboards list them.
LAYER_STATS: tuple[str, ...] = (
    "grad_norm",
    "act_rms",
    "dead_frac",
    "saturated_frac",
    "update_ratio",
    "param_grad_norm",
    "norm_drift",
)


def stats_for(kind: str) -> tuple[str, ...]:
    """The statistics that show ``kind``; gradient norm for kinds this table does not know yet."""
    return KIND_STATS.get(kind, ("grad_norm",))
