"""Errors a user can cause, and the one place that turns them into a clean exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad config, bad data or an unreachable service: one sentence saying what and where."""


def exit_on_user_error(fn: F) -> F:
    """Print a UserError as one line on stderr and exit 2 instead of showing a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
