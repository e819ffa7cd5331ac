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


class _Restore:
    def __init__(self, obj: Any, name: str, wrapper: Any) -> None:
        self.obj, self.name, self.wrapper = obj, name, wrapper

    def remove(self) -> None:
        if self.obj.__dict__.get(self.name) is self.wrapper:
            delattr(self.obj, self.name)  # the class's method shows through again


def call_first(obj: Any, name: str, callback: Callable[[], None]) -> _Restore:
    """Wrap method ``name`` of this one instance so that ``callback()`` runs before it; the returned
    handle's remove() restores the method. ``callback`` must not raise (run it inside the guard)."""
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        callback()
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    return _Restore(obj, name, wrapper)


def patch_scaler_update(scaler: Any, callback: Callable[[], None]) -> _Restore:
    """Wrap ``update`` on this one GradScaler instance; the returned handle's remove() restores it."""
    return call_first(scaler, "update", callback)
