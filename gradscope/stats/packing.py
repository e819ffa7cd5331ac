"""The typed pack of a collected step: named device tensors in, one transfer, named host arrays out.

Every statistic travels under a :class:`Key` (kind, layer, field) with the rule that combines it across
ranks (``SUM``, ``MAX``) or keeps it on its own rank (``LOCAL``). A vector whose positions mean different
things carries their names in its :class:`Entry`, so the unpacking side reads ``values.named(key)["sumsq"]``
and never counts offsets or reads flags. A key is stored and read by the same object, so a statistic cannot
be written under one name and read under another.

In a distributed run only the SUM and MAX entries enter a collective, and only after the ranks agreed on
their layout (see :class:`gradscope.stats.collector.Combiner`): a rank that ran a module the others did not,
or evaluated alone, never makes the collective's sizes disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch

SUM, MAX, LOCAL = "sum", "max", "local"
COMBINES = (SUM, MAX, LOCAL)


class Key(NamedTuple):
    """Where a statistic lives: its kind ("act", "grad", "norm", "eval_norm", "param", ...), the layer (or
    "" for the model as a whole), and the field's name."""

    kind: str
    layer: str
    field: str


@dataclass(frozen=True)
class Entry:
    """One packed statistic: its key, how ranks combine it, its length and (for vectors of different
    quantities) the name of each position."""

    key: Key
    combine: str
    size: int
    names: tuple[str, ...] = ()

    def identity(self) -> float:
        """The value a rank that did not measure this statistic contributes to the collective."""
        return 0.0 if self.combine == SUM else float("-inf")


class LayoutCombiner(Protocol):
    """Combines the shared (SUM/MAX) part of a pack across ranks; see collector.Combiner."""

    def agree(self, entries: list[Entry], device: torch.device) -> tuple[list[Entry], set[Key]]: ...

    def combine(self, buf: torch.Tensor, sum_len: int) -> torch.Tensor: ...


class Pack:
    """A step's statistics as named device tensors, moved to the host at once by :meth:`transfer`."""

    def __init__(self) -> None:
        self.entries: dict[Key, Entry] = {}
        self.tensors: dict[Key, torch.Tensor] = {}

    def put(self, key: Key, combine: str, t: torch.Tensor | None, names: Iterable[str] = ()) -> None:
        if t is None:
            return
        if combine not in COMBINES:
            raise ValueError(f"unknown combine rule {combine!r}")
        t = t.detach().reshape(-1)
        names = tuple(names)
        if names and len(names) != t.numel():
            raise ValueError(f"{key}: {len(names)} names for {t.numel()} values")
        self.entries[key] = Entry(key, combine, t.numel(), names)
        self.tensors[key] = t

    def drop_layer(self, kind: str, layer: str) -> None:
        """Forget everything one layer put (its statistic failed: nothing half-packed goes further)."""
        for key in [k for k in self.entries if k.kind == kind and k.layer == layer]:
            del self.entries[key], self.tensors[key]

    def device(self) -> torch.device | None:
        return next((t.device for t in self.tensors.values()), None)

    def transfer(self, combiner: LayoutCombiner | None = None, device: torch.device | None = None) -> Values:
        """Everything to the host in one copy; with a combiner, the shared entries combined across ranks."""
        shared = [e for e in self.entries.values() if e.combine != LOCAL]
        local = [e for e in self.entries.values() if e.combine == LOCAL]
        device = self.device() or device or torch.device("cpu")
        demoted: set[Key] = set()
        if combiner is not None:
            shared, demoted = combiner.agree(shared, device)
            local += [self.entries[k] for k in demoted if k in self.entries]
        shared.sort(key=lambda e: e.combine != SUM)  # [SUM entries | MAX entries], order kept otherwise
        sum_len = sum(e.size for e in shared if e.combine == SUM)
        pieces = [self._tensor(e, device) for e in shared]
        host = np.zeros(0, dtype=np.float32)
        if pieces or local:
            head = torch.cat(pieces) if pieces else torch.zeros(0, device=device)
            if combiner is not None and pieces:
                head = combiner.combine(head, sum_len)
            tail = [self._tensor(e, device) for e in local]
            host = torch.cat([head, *tail]).cpu().numpy()  # the one transfer (a single sync) of a step
        views: dict[Key, np.ndarray] = {}
        out: dict[Key, Entry] = {}
        cursor = 0
        for e in [*shared, *local]:
            views[e.key] = host[cursor : cursor + e.size]
            out[e.key] = e
            cursor += e.size
        return Values(views, out, demoted)

    def _tensor(self, e: Entry, device: torch.device) -> torch.Tensor:
        t = self.tensors.get(e.key)
        if t is None:  # a statistic other ranks measured and this one did not
            return torch.full((e.size,), e.identity(), dtype=torch.float32, device=device)
        return t if t.device == device and t.dtype == torch.float32 else t.to(device, torch.float32)


class Values:
    """The host side of a transferred pack: arrays and named slots by key."""

    def __init__(self, views: dict[Key, np.ndarray], entries: dict[Key, Entry], demoted: set[Key]) -> None:
        self._views = views
        self.entries = entries
        self.demoted = demoted  # keys that ranks could not agree on: this rank's own values

    def get(self, key: Key) -> np.ndarray | None:
        return self._views.get(key)

    def __contains__(self, key: Key) -> bool:
        return key in self._views

    def named(self, key: Key) -> dict[str, float]:
        """A vector's values by the names it was packed with ({} when absent)."""
        view = self._views.get(key)
        if view is None:
            return {}
        return dict(zip(self.entries[key].names, view.tolist(), strict=True))

    def layers(self, kind: str) -> list[str]:
        """Every layer with a statistic of ``kind``, in pack order (in a distributed run: of any rank)."""
        seen: dict[str, None] = {}
        for key in self._views:
            if key.kind == kind:
                seen.setdefault(key.layer, None)
        return list(seen)

    def fields(self, kind: str, layer: str) -> list[str]:
        return [k.field for k in self._views if k.kind == kind and k.layer == layer]
