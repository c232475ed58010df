"""Files written whole or not at all: a temporary name, then a rename; a full disk is named as such."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from .errors import SospError


class DiskFullError(SospError):
    """The disk filled up while an artifact was written (nothing half-written is left behind)."""


def save_atomically(obj: object, path: str | Path) -> Path:
    """torch.save to a temporary name, then rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:  # closed on any error, so removing the partial file frees its space at once
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except (OSError, RuntimeError) as exc:
        full = _disk_full(exc, path.parent)  # torch's zip writer words ENOSPC as "unexpected pos" / iostream errors
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"disk full (ENOSPC) while saving {path}: free space, then resume") from None
        raise
    tmp.replace(path)
    return path


def _disk_full(exc: Exception, folder: Path) -> bool:
    """Whether a failed write ran out of space: the error says so, or the disk has (almost) nothing left."""
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False


FULL_BELOW_BYTES = 1 << 20
