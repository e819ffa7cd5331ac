"""What every command shares: user mistakes become one line on stderr and the error's exit status."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from gradscope.errors import GradscopeError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit with ``code`` (2: bad usage or unreadable input)."""
    click.echo(f"gradscope: error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """Turn GradscopeError into one line on stderr and its exit code; no traceback for user mistakes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GradscopeError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)

    return wrapper  # type: ignore[return-value]
