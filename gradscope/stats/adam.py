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
    samples: list[torch.Tensor] = []  # a strided sample of v_hat's elements per parameter
    scale: list[torch.Tensor | float] = []  # per parameter: its group's lr
    bias: list[torch.Tensor | float] = []  # per parameter: 1 - beta2^t
    eps_of: list[float] = []
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
                flat = v.detach().reshape(-1)
                samples.append(flat[:: max(1, flat.numel() // SAMPLE)].float())
                step = state["step"]
                if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                    # capturable / fused optimizers keep step on the device: stay there, no host sync
                    bias.append(1.0 - beta2 ** step.float().to(samples[-1].device))
                else:
                    bias.append(1.0 - beta2 ** float(step))  # a host number: reading it is free
                scale.append(lr)
                eps_of.append(eps)
                out_names.append(name)
    if not samples:
        return [], torch.zeros(0)
    return out_names, _rms_effective_lr(samples, bias, eps_of, scale)


#: Elements of v read per parameter: an even stride over larger tensors. This is evidence, not a statistic
#: to the last digit, and reading all of v (three passes with temporaries) cost more than the rest of a
#: collected step on the CPU benchmark.
SAMPLE = 4096


def _rms_effective_lr(
    samples: list[torch.Tensor],
    bias: list[torch.Tensor | float],
    eps: list[float],
    lr: list[torch.Tensor | float],
) -> torch.Tensor:
    """Per parameter, sqrt(mean((lr / (sqrt(v / (1 - beta2^t)) + eps))^2)) over its sample: (P,) float32.

    All parameters are computed at once on the concatenated samples (a handful of ops in all, not a
    handful per parameter), then averaged per parameter with one segment reduction.
    """
    device = samples[0].device
    lengths = torch.tensor([s.numel() for s in samples], device=device)
    v = torch.cat([s.to(device) for s in samples])

    def per_param(xs: list[torch.Tensor | float]) -> torch.Tensor:
        if not any(isinstance(x, torch.Tensor) for x in xs):
            return torch.tensor(xs, dtype=torch.float32, device=device)  # one op for host numbers
        return torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device) for x in xs])

    expand = lambda t: t.repeat_interleave(lengths)  # noqa: E731
    denom = (v / expand(per_param(bias))).sqrt_().add_(expand(per_param(eps)))
    effective = expand(per_param(lr)) / denom  # the per-element effective learning rate
    mean_sq = torch.segment_reduce(effective.square_(), "mean", lengths=lengths)
    return mean_sq.sqrt()
