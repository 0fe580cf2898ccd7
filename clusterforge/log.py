"""Logging, progress and user-facing errors.

User errors (bad input, missing prerequisites) go through `die()`, which raises
`UserError`; the entry point prints it without a traceback. Bugs raise normally.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

VERBOSE = False


class UserError(Exception):
    """An error the user can fix; printed as a message and a hint, never a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f"\n  hint: {self.hint}" if self.hint else "")


def die(message: str, hint: str | None = None) -> NoReturn:
    raise UserError(message, hint)


def shorten(value: object, limit: int = 40) -> str:
    """A user's value quoted for a message: non-printable characters escaped (never cut in
    half), at most `limit` characters of it shown."""
    text = value if isinstance(value, str) else str(value)
    shown: list[str] = []
    used = 0
    for char in text:
        piece = "\\'" if char == "'" else "\\\\" if char == "\\" else char if char.isprintable() else repr(char)[1:-1]
        if used + len(piece) > limit:
            return f"'{''.join(shown)}...' ({len(text)} characters)"
        shown.append(piece)
        used += len(piece)
    return f"'{''.join(shown)}'"


def set_verbose(on: bool) -> None:
    global VERBOSE
    VERBOSE = on


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def debug(message: str) -> None:
    if VERBOSE:
        print(message, file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Report a long step: its name when it starts and the elapsed time when it ends."""
    start = time.monotonic()
    info(f"==> {name}")
    try:
        yield
    except BaseException:
        info(f"<== {name}: failed after {time.monotonic() - start:.1f}s")
        raise
    info(f"<== {name}: {time.monotonic() - start:.1f}s")
