"""Exceptions with messages meant for the user: what went wrong and what to do."""

from __future__ import annotations

import errno


class SospError(Exception):
    """Base class of every error the engine raises on bad input."""


class ModelSpecError(SospError):
    """A model spec string cannot be turned into a model."""


class CheckpointError(SospError):
    """A checkpoint cannot be loaded into the model."""


class DataSpecError(SospError):
    """A data spec string cannot be turned into data loaders."""


class MaskError(SospError):
    """A mask does not fit the model it is applied to."""


class AnalysisError(SospError):
    """An analysis cannot be run or loaded as asked."""


def one_line_error(exc: BaseException) -> str:
    """An exception as one readable line: a full disk, a missing file and memory are said in plain words."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full (ENOSPC): {exc.filename or ''} - free space and try again"
    if is_out_of_memory(exc):
        return "not enough memory for this input or model size: use fewer samples, a smaller batch or a smaller model"
    if isinstance(
        exc, (IsADirectoryError, NotADirectoryError, FileNotFoundError, PermissionError, FileExistsError)
    ):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}"


def is_out_of_memory(exc: BaseException) -> bool:
    """A CPU or GPU allocation failure (torch raises these as RuntimeError subclasses, Python as MemoryError)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()
