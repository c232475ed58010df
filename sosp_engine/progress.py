"""Progress reporting and cancellation shared by long computations (analyses, training, jobs)."""

from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Optional[Callable[[float, str], None]]
StopFn = Optional[Callable[[], bool]]


class Cancelled(Exception):
    """The caller asked a long computation to stop."""


def report(progress: ProgressFn, fraction: float, message: str) -> None:
    """Call the progress callback if there is one."""
    if progress is not None:
        progress(min(max(fraction, 0.0), 1.0), message)


def check_cancel(should_stop: StopFn) -> None:
    """Raise Cancelled when the caller asked to stop."""
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled by the user")


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 layer', '3 layers': a count with its noun in the right number, for messages and progress lines."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
