"""Open a checkpoint safely and read it tensor by tensor.

Formats: a ``torch.save`` file (a state_dict, or a dict holding one such as a Lightning ``.ckpt``), a
``.safetensors`` file, or a folder of shards with its index. Nothing here runs code from a pickle unless
the caller passes ``trust_pickle=True``: ``torch.load(weights_only=True)`` refuses arbitrary globals, and
files it refuses are only *parsed* (``pickletools``), never loaded, to say why.

Memory: files are memory-mapped and read one tensor at a time. Pages of a mapping that have been read
stay resident (and count in RSS) until the mapping goes, so readers re-open their file before the
tensors read through one mapping would exceed ``WINDOW_BYTES``; resident pages then stay near the
larger of the window and the largest tensor.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

#: Bytes of tensors read through one mapping before the file is re-opened to release its pages.
WINDOW_BYTES = 256 << 20

# Keys under which training scripts nest the model's state_dict, in order of preference. A Lightning
# checkpoint uses "state_dict" next to optimizer states and loop counters; many scripts save
# {"model": ..., "optimizer": ..., "epoch": ...}; DeepSpeed/others use "module"; tutorials "model_state_dict".
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "module")

# Counters that training scripts store next to the weights; a positive one proves training happened.
PROGRESS_KEYS: tuple[str, ...] = ("global_step", "epoch", "step", "iteration", "iter", "num_updates")

# Entries that hold optimizer state; their presence means the weights come from a training run.
OPTIMIZER_KEYS: tuple[str, ...] = ("optimizer", "optimizer_states", "optimizer_state_dict", "optim")

# Index files of sharded checkpoints (Hugging Face layout), and the single-file names of the same layout.
INDEX_FILES: tuple[str, ...] = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")

# safetensors dtype codes → (torch dtype name, bytes per element).
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

SAFETENSORS_HINT = "pip install 'gradscope[safetensors]'"


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, before it is read."""

    name: str  # display name: wrapper prefixes such as "module." / "_orig_mod." stripped
    key: str  # the key as stored in the file
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass
class Checkpoint:
    """An opened checkpoint: its tensors' names and sizes, and a bounded-memory way to read them."""

    path: Path
    format: str  # "torch", "safetensors", "sharded safetensors", "sharded torch"
    entries: list[Entry]
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"wrapper": "state_dict", "epoch": 3}
    _readers: list[tuple[Any, list[Entry]]] = field(default_factory=list, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def tensors(self) -> Iterator[tuple[Entry, torch.Tensor]]:
        """Yield each tensor with its entry. Do not keep the tensors: they are views of a mapping."""
        for reader, entries in self._readers:
            by_key = {e.key: e for e in entries}
            for key, tensor in reader.read([e.key for e in entries]):
                yield by_key[key], tensor
                del tensor  # hold no view of a mapping while the reader decides to re-open its file

    def state_dict(self, original_keys: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor at once (memory-mapped where the format allows), for loading into a model."""
        return {(e.key if original_keys else e.name): t for e, t in self.tensors()}


def open_checkpoint(path: str | Path, trust_pickle: bool = False) -> Checkpoint:
    """Open ``path`` for reading; raise CheckpointError (one line naming the file) if it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        return _open_folder(p, trust_pickle)
    if not p.is_file():
        raise CheckpointError(f"{p}: not a regular file")
    _check_readable(p)
    if _is_safetensors(p):
        reader: Any = _SafetensorsFile(p)
        fmt = "safetensors"
    else:
        reader = _TorchFile(p, trust_pickle)
        fmt = "torch"
    entries = _with_display_names(reader.entries())
    return Checkpoint(p, fmt, entries, dict(getattr(reader, "meta", {})), [(reader, entries)])


# --- display names ----------------------------------------------------------------------------------


def _with_display_names(raw: list[Entry]) -> list[Entry]:
    """Strip the prefixes that wrappers add (DDP's "module.", torch.compile's "_orig_mod.")."""
    keys = [e.key for e in raw]
    names = strip_prefixes(keys)
    return [Entry(names[e.key], e.key, e.shape, e.dtype, e.nbytes) for e in raw]


def strip_prefixes(keys: list[str]) -> dict[str, str]:
    """Map each key to its display name; keys are left alone if stripping would make two of them collide."""
    names = list(keys)
    # DDP / DataParallel wrap the whole model: only strip "module." when every key carries it, since a
    # real submodule may be called "module".
    while names and all(n.startswith("module.") for n in names):
        names = [n[len("module."):] for n in names]
    # torch.compile wraps a module (the model or any submodule) as "_orig_mod": it is never a real name.
    names = [re.sub(r"(^|\.)_orig_mod\.", r"\1", n) for n in names]
    if len(set(names)) != len(names):
        return {k: k for k in keys}
    return dict(zip(keys, names, strict=True))


def natural_key(name: str) -> list[Any]:
    """Sort "layers.2" before "layers.10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# --- torch.save files -------------------------------------------------------------------------------


class _TorchFile:
    """A torch.save file, loaded with weights_only (and memory-mapped when it is a zip archive)."""

    def __init__(self, path: Path, trust_pickle: bool) -> None:
        self.path = path
        self.trust_pickle = trust_pickle
        self.mmap = zipfile.is_zipfile(path)
        self.meta: dict[str, Any] = {}
        self._cached: dict[str, torch.Tensor] | None = self._load()

    def _load(self) -> dict[str, torch.Tensor]:
        obj = _torch_load(self.path, self.trust_pickle, self.mmap)
        state, self.meta = extract_state_dict(obj, self.path)
        return state

    def entries(self) -> list[Entry]:
        state = self._cached if self._cached is not None else self._load()
        return [Entry(k, k, tuple(t.shape), str(t.dtype).removeprefix("torch."), _nbytes(t))
                for k, t in state.items()]

    def read(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        # Re-loading a mapped zip only re-reads its small pickle; a trusted pickle would run its code
        # again, and a legacy (non-zip) file is in memory already, so those are loaded once and kept.
        reloadable = self.mmap and not self.trust_pickle
        state = self._cached if self._cached is not None else self._load()
        if reloadable:
            self._cached = None  # let the mapping go once this window's tensors are dropped
        touched = 0
        for key in keys:
            size = _nbytes(state[key])
            if reloadable and touched and touched + size > WINDOW_BYTES:
                state = {}  # drop the old mapping first: resident pages stay near max(window, tensor)
                state = self._load()
                touched = 0
            tensor = state[key]
            yield key, tensor
            del tensor
            touched += size


def _torch_load(path: Path, trust_pickle: bool, mmap: bool) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols and its own defaults; the user cannot act on those.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except Exception as exc:
        if trust_pickle and not mmap and "magic number" in str(exc):
            return _plain_pickle_load(path)  # a raw pickle (pickle.dump) rather than a torch.save file
        raise CheckpointError(f"{path}: {_explain_torch_failure(path, exc, mmap)}") from None


def _plain_pickle_load(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return pickle.load(f)  # only reached with trust_pickle=True
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot unpickle: {_first_line(exc)}") from None


def _explain_torch_failure(path: Path, exc: Exception, mmap: bool) -> str:
    """One line saying why torch.load failed, without loading anything."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return _needs_pickle(found.group(1))
    with path.open("rb") as f:
        head = f.read(4)
    if not mmap and head == b"PK\x03\x04":
        return "truncated or corrupt torch.save archive (its zip directory is missing)"
    if mmap:
        return f"corrupt torch.save archive: {_first_line(exc)}"
    globals_used = _pickle_globals(path)
    if globals_used is None:
        return "not a checkpoint: neither a torch.save file, a pickle nor a safetensors file"
    if globals_used:
        return _needs_pickle(", ".join(globals_used[:3]))
    return "a plain pickle, not a torch.save file: it cannot be read without unpickling it"


def _needs_pickle(what: str) -> str:
    return (f"loading it would run code from the file (it references {what}); refused. "
            "Pass --trust-pickle only if you trust where the file comes from")


def _pickle_globals(path: Path, limit: int = 1 << 20) -> list[str] | None:
    """The globals a pickle references, found by parsing its opcodes (nothing is executed).

    None when the file is not a pickle at all.
    """
    with path.open("rb") as f:
        data = f.read(limit)
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:
        # A pickle cut short by ``limit`` still shows its globals; anything else that fails to parse
        # is not a pickle (random bytes can look like a few valid opcodes).
        if len(data) < limit:
            return None
    return list(dict.fromkeys(found))


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state_dict inside what torch.load returned; raise CheckpointError if there is none."""
    meta: dict[str, Any] = {}
    if isinstance(obj, torch.nn.Module):  # a full-model pickle, only loadable with trust_pickle
        meta["wrapper"] = f"pickled {type(obj).__name__}"
        return dict(obj.state_dict()), meta
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict of tensors")
    for key in PROGRESS_KEYS:
        value = obj.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            meta[key] = value
    if any(k in obj for k in OPTIMIZER_KEYS):
        meta["optimizer_state"] = 1
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            meta["wrapper"] = key
            return dict(inner.state_dict()), meta
        if isinstance(inner, Mapping):
            state = _tensor_tree(inner)
            if state:
                meta["wrapper"] = key
                return state, meta
    state = _tensor_tree(obj, top=True)
    if not state:
        keys = ", ".join(str(k) for k in list(obj)[:6]) or "none"
        raise CheckpointError(f"{path}: holds no tensors (a dict with keys: {keys}); expected a state_dict "
                              f"or a dict holding one under {' / '.join(WRAPPER_KEYS)}")
    return state, meta


def _tensor_tree(obj: Mapping[Any, Any], top: bool = False, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a dict of tensors (and of dicts of tensors) into dotted names.

    At the top level other values (epoch counters, optimizer state lists, hyper-parameters) are skipped;
    below it a sub-dict counts only if it holds nothing but tensors, so optimizer state never passes
    for weights.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping) and top and str(key) not in OPTIMIZER_KEYS:
            sub = _tensor_tree(value, prefix=f"{name}.")
            if sub and len(sub) == _leaf_count(value):
                out.update(sub)
        elif isinstance(value, Mapping) and not top:
            out.update(_tensor_tree(value, prefix=f"{name}."))
        elif not top:
            return {}
    return out


def _leaf_count(obj: Mapping[Any, Any]) -> int:
    return sum(_leaf_count(v) if isinstance(v, Mapping) else 1 for v in obj.values())


# --- safetensors ------------------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    """By extension, or by its header: an 8-byte little-endian length followed by a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= path.stat().st_size - 8


def _safe_open(path: Path) -> Any:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package: "
                              f"{SAFETENSORS_HINT}") from None
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file: {_first_line(exc)}") from None


class _SafetensorsFile:
    """A .safetensors file, read lazily through the safetensors package."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta: dict[str, Any] = {}
        with _safe_open(path) as f:
            self._entries = []
            for key in sorted(f.keys(), key=natural_key):
                view = f.get_slice(key)
                dtype, size = SAFETENSORS_DTYPES.get(view.get_dtype(), (view.get_dtype().lower(), 0))
                shape = tuple(int(d) for d in view.get_shape())
                numel = 1
                for d in shape:
                    numel *= d
                self._entries.append(Entry(key, key, shape, dtype, numel * size))

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def read(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        sizes = {e.key: e.nbytes for e in self._entries}
        handle = _safe_open(self.path)
        try:
            f = handle.__enter__()
            touched = 0
            for key in keys:
                size = sizes.get(key, 0)
                if touched and touched + size > WINDOW_BYTES:  # re-open: closing unmaps the pages read so far
                    handle.__exit__(None, None, None)
                    handle = f = None
                    handle = _safe_open(self.path)
                    f = handle.__enter__()
                    touched = 0
                try:
                    tensor = f.get_tensor(key)
                except Exception as exc:
                    raise CheckpointError(f"{self.path}: cannot read tensor {key}: {_first_line(exc)}") from None
                yield key, tensor
                del tensor
                touched += size
        finally:
            handle.__exit__(None, None, None)


# --- sharded folders --------------------------------------------------------------------------------


def _open_folder(folder: Path, trust_pickle: bool) -> Checkpoint:
    for name in INDEX_FILES:
        if (folder / name).is_file():
            return _open_sharded(folder / name, trust_pickle)
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            ckpt = open_checkpoint(folder / name, trust_pickle)
            ckpt.path = folder
            return ckpt
    raise CheckpointError(f"{folder}: a directory without {' or '.join(INDEX_FILES)} "
                          f"(nor a single {' / '.join(SINGLE_FILES)})")


def _open_sharded(index: Path, trust_pickle: bool) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("empty weight_map")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({_first_line(exc) or 'no weight_map'})") from None
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        # The index names files next to it; anything else (absolute, "..") is refused, not followed.
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index}: shard name {shard!r} for {key} is not a file in this folder")
        shards.setdefault(shard, []).append(key)
    readers: list[tuple[Any, list[Entry]]] = []
    raw: list[Entry] = []
    meta: dict[str, Any] = {}
    for shard in sorted(shards, key=natural_key):
        path = index.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {shard} listed in the index is missing")
        _check_readable(path)
        reader: Any = _SafetensorsFile(path) if _is_safetensors(path) else _TorchFile(path, trust_pickle)
        meta.update(getattr(reader, "meta", {}))
        available = {e.key: e for e in reader.entries()}
        missing = [k for k in shards[shard] if k not in available]
        if missing:
            raise CheckpointError(f"{path}: lacks {len(missing)} tensor(s) the index puts there, e.g. {missing[0]}")
        mine = [available[k] for k in sorted(shards[shard], key=natural_key)]
        raw.extend(mine)
        readers.append((reader, mine))
    names = strip_prefixes([e.key for e in raw])
    renamed = {e.key: Entry(names[e.key], e.key, e.shape, e.dtype, e.nbytes) for e in raw}
    readers = [(r, [renamed[e.key] for e in es]) for r, es in readers]
    fmt = "sharded safetensors" if index.name.startswith("model.safetensors") else "sharded torch"
    return Checkpoint(index.parent, fmt, [renamed[e.key] for e in raw], meta, readers)


# --- helpers ----------------------------------------------------------------------------------------


def _check_readable(path: Path) -> None:
    """Fail early, in one line, on a file that cannot be opened or is empty."""
    try:
        with path.open("rb") as f:
            empty = not f.read(1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if empty:
        raise CheckpointError(f"{path}: file is empty")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
