"""torch.distributed awareness: one report for the whole job, written by rank 0 only.

Without an initialized process group (or with a world of one) everything here is a no-op and gradscope
behaves as a single process.
"""

from __future__ import annotations

from torch import nn

from .stats.collector import Combiner


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def combiner() -> Combiner | None:
    """A combiner over the default process group when there is more than one rank."""
    dist = _dist()
    if dist is None or dist.get_world_size() < 2:
        return None
    return Combiner(device=collective_device())


def collective_device():  # type: ignore[no-untyped-def]
    """Where this process group's collectives run: the current CUDA device for NCCL, else the CPU."""
    import torch

    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None  # gloo and others: the buffer's own device


def is_main_process() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel (or DataParallel) wrapper holds: layers keep the names they
    have in the user's own model, identical to a single-process run."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, parallel):
        model = model.module
    return model


def is_sharded(t: object) -> bool:
    """A DTensor (FSDP2 parameters and gradients): its local shard is what this rank holds."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


def local(t):  # type: ignore[no-untyped-def]
    """This rank's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t
