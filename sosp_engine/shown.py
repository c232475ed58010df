"""Text from stored rows, files and models, neutralised for the medium that shows it: a terminal never obeys a
name's escape sequences or bidi overrides, a spreadsheet never runs a cell as a formula."""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

import pandas as pd

from .atomic import write_text_atomically

# C0 and C1 controls, DEL, and the characters that reorder or hide text (bidi embeddings, overrides, isolates, marks)
_HIDDEN = "\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
_UNSHOWABLE = re.compile(f"[\x00-\x1f{_HIDDEN}]")
_UNSHOWABLE_IN_LINES = re.compile(f"[\x00-\x09\x0b-\x1f{_HIDDEN}]")  # a page may break lines
_UNSAFE_IN_STREAM = re.compile(
    f"[\x00-\x08\x0b\x0c\x0e-\x1f{_HIDDEN}]"
)  # keeps tab, newline, carriage return
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def terminal_text(text: object, keep_newlines: bool = False) -> str:
    """`text` with every control, bidi and invisible character written as its escape (`\\x1b`, `\\u202e`), so what a
    terminal or a page shows is what is stored (a page may keep its line breaks)."""
    pattern = _UNSHOWABLE_IN_LINES if keep_newlines else _UNSHOWABLE
    return pattern.sub(_escaped, str(text))


class TerminalStream:
    """A text stream that writes what it is given with escape sequences and bidi controls escaped (tab, newline and
    carriage return kept for tables and progress lines): nothing a name or a log holds can command the terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(_UNSAFE_IN_STREAM.sub(_escaped, text))
        return len(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


@contextmanager
def terminal_streams() -> Iterator[None]:
    """stdout and stderr as TerminalStreams while the block runs (a CLI command)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TerminalStream(sys.stdout), TerminalStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _escaped(match: re.Match) -> str:
    return match.group(0).encode("unicode_escape").decode("ascii")


def csv_cell(value: object) -> object:
    """A cell a spreadsheet would run as a formula (= + - @ tab CR first) prefixed by a quote; others as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def safe_csv(data: pd.DataFrame) -> str:
    """CSV text of a table whose text cells are never formulas (see csv_cell)."""
    return data.map(csv_cell).to_csv(index=False)


def write_safe_csv(data: pd.DataFrame, path: str | Path) -> None:
    """Write a table as CSV with formula-safe cells (see csv_cell), whole or not at all."""
    write_text_atomically(path, safe_csv(data))
