"""Hooks around the optimizer step: closures that compute gradients inside step(), and GradScaler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def closure_of(opt: object, args: tuple, kwargs: dict) -> tuple[Any, int | None]:
    """The closure passed to ``opt.step(...)`` and its position in ``args`` (None: a keyword).

    A step pre-hook receives step()'s own arguments, with the optimizer itself first: (opt, closure?).
    """
    if "closure" in kwargs:
        return kwargs["closure"], None
    pos = 1 if args and args[0] is opt else 0
    return (args[pos] if len(args) > pos else None), pos


def with_closure(args: tuple, kwargs: dict, pos: int | None, closure: Any) -> tuple[tuple, dict]:
    """step()'s arguments with the closure replaced."""
    if pos is None:
        return args, {**kwargs, "closure": closure}
    return (*args[:pos], closure, *args[pos + 1 :]), kwargs


def after_first_call(closure: Callable[..., Any], then: Callable[[], None]) -> Callable[..., Any]:
    """``closure`` that runs ``then()`` once, right after its first call returns (LBFGS calls it again)."""
    done = False

    def run(*a: Any, **k: Any) -> Any:
        nonlocal done
        result = closure(*a, **k)
        if not done:
            done = True
            then()
        return result

    return run


class _RestoreUpdate:
    def __init__(self, scaler: Any, wrapper: Any) -> None:
        self.scaler, self.wrapper = scaler, wrapper

    def remove(self) -> None:
        if self.scaler.__dict__.get("update") is self.wrapper:
            del self.scaler.update  # the class's method shows through again


def patch_scaler_update(scaler: Any, callback: Callable[[], None]) -> _RestoreUpdate:
    """Wrap ``update`` on this one GradScaler instance; the returned handle's remove() restores it."""
    original = scaler.update

    def update(*args: Any, **kwargs: Any) -> Any:
        callback()
        return original(*args, **kwargs)

    scaler.update = update
    return _RestoreUpdate(scaler, update)
