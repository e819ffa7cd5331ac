"""One owner for every hook handle gradscope adds, so close() can remove them all."""

from __future__ import annotations

from torch.utils.hooks import RemovableHandle


class HandleSet:
    """Keeps handles in two groups: for the whole watch (modules, optimizers) and for one step (tensors)."""

    def __init__(self) -> None:
        self.persistent: list[RemovableHandle] = []
        self.per_step: list[RemovableHandle] = []

    def keep(self, handle: RemovableHandle) -> None:
        self.persistent.append(handle)

    def keep_for_step(self, handle: RemovableHandle) -> None:
        self.per_step.append(handle)

    def end_step(self) -> None:
        """Tensor hooks of a finished step: removed even if their backward never ran."""
        for handle in self.per_step:
            handle.remove()
        self.per_step.clear()

    def remove_all(self) -> None:
        self.end_step()
        for handle in reversed(self.persistent):
            handle.remove()
        self.persistent.clear()
