"""Finding the tensors inside whatever a module returns: tensors, tuples, lists, dicts, dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch


def iter_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) module output, in a stable order; non-tensors are skipped."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth > 4:  # outputs nest shallowly in practice; stop rather than walk arbitrary object graphs
        return
    if isinstance(obj, dict):  # includes Hugging Face ModelOutput (an OrderedDict)
        for value in obj.values():
            yield from iter_tensors(value, depth + 1)
    elif isinstance(obj, (list, tuple)):  # includes namedtuples and PackedSequence
        for value in obj:
            yield from iter_tensors(value, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name, None), depth + 1)


def floating(obj: Any) -> list[torch.Tensor]:
    """The floating-point tensors of an output: the ones with activations and gradients to measure."""
    return [t for t in iter_tensors(obj) if t.is_floating_point() or t.is_complex()]
