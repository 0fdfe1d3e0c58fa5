"""Errors a user can cause, and the one place that turns them into a clean exit."""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad config, bad data or an unreachable service: one sentence saying what and where."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C: said in one line, exit status 130 like any interrupted command."""

    exit_code = 130


def check_writable(folder: str | Path, key: str, fix: str | None = None) -> Path:
    """Create ``folder`` if needed and check a file can be written there, before any work.
    The error says to set ``key`` to a writable folder, or says ``fix``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {folder} ({err.strerror or err}); "
                        f"{fix or f'set {key} to a writable folder'}") from None
    return folder


def exit_on_user_error(fn: F) -> F:
    """Print a UserError (or Ctrl-C) as one line on stderr and exit non-zero instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
