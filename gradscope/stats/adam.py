"""Adam-family evidence: how large a step the second-moment estimate allows each parameter to take.

Adam's step for one element is ``lr * m_hat / (sqrt(v_hat) + eps)``. The factor ``lr / (sqrt(v_hat) + eps)``
is its *effective learning rate*: when ``v_hat`` is tiny (a parameter whose gradients were near zero) it
approaches ``lr / eps`` (1e5 x lr with the default eps), and the next real gradient becomes a huge step.
Its RMS over a parameter's elements is what ``ParamStats.adam_step_rms`` holds.
"""

from __future__ import annotations

import torch

# Optimizers whose state and step follow Adam's update exactly (AdamW only adds decoupled weight decay).
ADAM_FAMILY: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, ADAM_FAMILY)


def adam_step_rms(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[list[str], torch.Tensor]:
    """RMS of ``lr / (sqrt(v_hat) + eps)`` per parameter, computed on the device after ``optimizer.step()``.

    Args:
        optimizer: the watched optimizer; anything outside :data:`ADAM_FAMILY` gives nothing.
        names: ``id(param) -> name`` of the parameters to measure (others are skipped).

    Returns:
        The parameter names and a float32 tensor of their RMS values (one per name) on the first
        parameter's device: move it to the host once, together with the step's other statistics.
    """
    if not is_adam(optimizer):
        return [], torch.zeros(0)
    out_names: list[str] = []
    values: list[torch.Tensor] = []
    with torch.no_grad():
        for group in optimizer.param_groups:
            beta2, eps, lr = group["betas"][1], group["eps"], group["lr"]
            for p in group["params"]:
                name = names.get(id(p))
                state = optimizer.state.get(p)
                if name is None or not state or "exp_avg_sq" not in state or "step" not in state:
                    continue
                # AMSGrad divides by the running maximum of v instead of v itself.
                v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state["exp_avg_sq"]
                if v is None or v.numel() == 0:
                    continue
                values.append(_rms_effective_lr(v, state["step"], beta2, eps, lr))
                out_names.append(name)
    if not values:
        return [], torch.zeros(0)
    device = values[0].device
    return out_names, torch.stack([x.to(device) for x in values])


def _rms_effective_lr(
    v: torch.Tensor, step: torch.Tensor | float, beta2: float, eps: float, lr: torch.Tensor | float
) -> torch.Tensor:
    """sqrt(mean((lr / (sqrt(v / (1 - beta2^t)) + eps))^2)) over all elements: a 0-dim float32 tensor."""
    v32 = v.detach().float()
    # step may live on the device (capturable / fused): keep it there, no host sync.
    t = step.to(v32.device, torch.float32) if isinstance(step, torch.Tensor) else torch.tensor(float(step))
    bias2 = 1.0 - torch.as_tensor(beta2, dtype=torch.float32, device=v32.device) ** t.to(v32.device)
    denom = (v32 / bias2).sqrt_().add_(eps)  # (same shape as the parameter)
    rms = denom.reciprocal_().square_().mean().sqrt()
    lr_t = lr.to(v32.device, torch.float32) if isinstance(lr, torch.Tensor) else lr
    return rms * lr_t
