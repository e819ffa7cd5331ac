"""The probe: build the user's model, load the checkpoint into it strictly, and run forward/backward
passes on synthetic input under ``gradscope.watch`` (no weight update) to add gradient-flow findings."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..config import Thresholds
from ..errors import CheckpointError, UsageError
from ..findings import Report

#: Keys listed per category in a mismatch message before "(+N more)".
SHOWN_KEYS = 8

#: Input dtypes accepted by --input-dtype, by name.
INPUT_DTYPES: dict[str, torch.dtype] = {
    "float": torch.float32, "float32": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "long": torch.long, "int64": torch.long, "int": torch.long,
}


def resolve_model(model: nn.Module | Callable[[], nn.Module] | str) -> nn.Module:
    """An nn.Module from a module, a callable returning one, or "MODULE:CALLABLE" importable from the cwd."""
    if isinstance(model, nn.Module):
        return model
    spec = model
    if isinstance(model, str):
        model = _import(model)
    if not callable(model):
        raise UsageError(f"--model {spec}: not callable")
    try:
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten by the checkpoint anyway
            built = model()
    except Exception as exc:
        raise UsageError(f"--model {spec}: calling it failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(built, nn.Module):
        raise UsageError(f"--model {spec}: returned a {type(built).__name__}, not a torch.nn.Module")
    return built


def _import(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model must be MODULE:CALLABLE (e.g. mymodels:build_model), got {spec!r}")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)  # "python -c" semantics: the user's own modules next to them
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(f"--model {spec}: cannot import {module_name} (from {cwd}): "
                         f"{type(exc).__name__}: {_first_line(exc)}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--model {spec}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    return obj


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """(8, 3, 32, 32) from "8,3,32,32"; every dimension a positive integer."""
    parts = text.replace("x", ",").split(",") if isinstance(text, str) else list(text)
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(f"--input-shape must be positive integers separated by commas (N,C,...), got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape must be positive integers separated by commas (N,C,...), got {text!r}")
    return shape


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor],
                where: str) -> dict[str, str]:
    """load_state_dict(strict=True), with one line listing missing, unexpected and mis-shaped keys.

    A key the file lacks is not missing when the model ties it to a key the file has (``save_pretrained``
    leaves tied parameters out: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``): loading one
    loads both. Returns those ties, ``{absent key: the loaded key it is tied to}``.
    """
    expected = model.state_dict(keep_vars=True)
    # Display names have wrapper prefixes stripped; a model that itself carries them wants the originals.
    if set(original) == set(expected) and set(state) != set(expected):
        state = original
    tied = tied_keys(expected, state)
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (checkpoint {list(state[k].shape)}, model {list(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    parts = [f"{label}: {_some(keys)}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if keys]
    if parts:
        raise CheckpointError(f"{where}: does not match the model: " + "; ".join(parts))
    try:
        result = model.load_state_dict(state, strict=not tied)
    except Exception as exc:
        raise CheckpointError(f"{where}: cannot be loaded into the model: {_first_line(exc)}") from None
    left = [k for k in getattr(result, "missing_keys", []) if k not in tied]
    if left:  # strict=False only ever forgives the tied keys
        raise CheckpointError(f"{where}: does not match the model: missing keys: {_some(left)}")
    return tied


def tied_keys(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> dict[str, str]:
    """Keys of ``expected`` absent from ``state`` whose tensor is the very tensor of a key ``state`` has."""
    by_tensor: dict[int, str] = {}
    for k, v in expected.items():
        if k in state:
            by_tensor.setdefault(id(v), k)
    return {k: by_tensor[id(v)] for k, v in expected.items() if k not in state and id(v) in by_tensor}


def synthetic_input(model: nn.Module, shape: tuple[int, ...], dtype: str | torch.dtype | None = None,
                    vocab: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normal noise, or integer tokens for a model that starts with an Embedding (or dtype long)."""
    if isinstance(dtype, str):
        if dtype.lower() not in INPUT_DTYPES:
            raise UsageError(f"--input-dtype must be one of {', '.join(sorted(INPUT_DTYPES))}, got {dtype!r}")
        dtype = INPUT_DTYPES[dtype.lower()]
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if dtype is None and isinstance(first, (nn.Embedding, nn.EmbeddingBag)):
        dtype = torch.long
    if dtype is not None and not dtype.is_floating_point:
        if vocab is None and isinstance(first, (nn.Embedding, nn.EmbeddingBag)):
            vocab = first.num_embeddings
        if vocab is None or vocab < 1:
            raise UsageError("integer input needs --vocab N (the number of token ids)")
        return torch.randint(0, vocab, shape, generator=generator, dtype=dtype).to(device)
    if dtype is None:
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def synthetic_loss(output: Any) -> torch.Tensor:
    """Half the mean square of every floating output that needs a gradient (tuples, dicts, dataclasses).

    Its gradient is proportional to the outputs themselves, so exploding outputs show as large gradients.
    """
    found = [t for t in _tensors(output) if t.is_floating_point() and t.requires_grad and t.numel()]
    if not found:
        raise UsageError("the model's output holds no floating tensor that requires grad: nothing to backpropagate")
    return sum((t.float().pow(2).mean() for t in found), torch.zeros(())) * 0.5


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for name in obj.__dataclass_fields__ for t in _tensors(getattr(obj, name))]
    return []


def run_probe(model: nn.Module, make_input: Callable[[], torch.Tensor], thresholds: Thresholds | None = None,
              passes: int | None = None) -> Report:
    """Forward/backward passes on fresh synthetic batches under watch(every=1); no weight is updated.

    ``passes`` defaults to ``thresholds.min_steps``: the rules that need several observations (a
    parameter that never gets a gradient, a sustained symptom) then apply as they would in training.
    Gradients are cleared after each pass, and the caller's RNG state is left as it was.
    """
    from ..scope import watch  # imported late: the engine is not needed for weight-only inspection

    th = thresholds if thresholds is not None else Thresholds()
    n = max(1, int(passes if passes is not None else th.min_steps))
    model.train()  # as in training: batch statistics, dropout (seeded below)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with watch(model, every=1, thresholds=th) as scope:
            for _ in range(n):
                x = make_input()
                try:
                    loss = synthetic_loss(model(x))
                    loss.backward()
                except UsageError:
                    raise
                except Exception as exc:
                    raise UsageError(f"the probe pass failed on synthetic input of shape {list(x.shape)} "
                                     f"({str(x.dtype).removeprefix('torch.')}): {type(exc).__name__}: "
                                     f"{_first_line(exc)}") from None
                scope.step(loss=float(loss.detach()))
                model.zero_grad(set_to_none=True)  # no optimizer: each pass must see only its own gradient
            report = scope.report()
    return report


def _some(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
