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
