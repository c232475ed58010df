"""What the CLI prints: progress on stderr (one updating line), results as JSON on stdout or into a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..shown import terminal_text


def progress_line(message: str) -> None:
    """One progress line on stderr (stdout is kept for results)."""
    print(message, file=sys.stderr, flush=True)


def print_damaged(what: str, damaged: list[str]) -> None:
    """Each damaged record as one row of the listing (its id and the field at fault); the other rows stand."""
    for line in damaged:
        record_id, _, why = line.partition(": ")
        print(terminal_text(f"{record_id}  damaged    {why}"))
        progress_line(
            terminal_text(
                f"warning: {what} record {record_id} is not used, {why} (jobs delete {record_id} --yes removes it)"
            )
        )


def emit(result: dict, out: str | None) -> None:
    """Print the result as JSON on stdout, or write it to `out`."""
    text = json.dumps(result, indent=1, default=str)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        progress_line(f"wrote {out}")
    else:
        print(text)


class ProgressLine:
    """A single updating progress line on stderr."""

    def __init__(self, label: str) -> None:
        self.label, self.last = label, -1

    def __call__(self, fraction: float, message: str) -> None:
        percent = int(fraction * 100)
        if percent != self.last:
            self.last = percent
            print(f"\r{self.label}: {percent:3d}% {message:<40}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr, flush=True)
