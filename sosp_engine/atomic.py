"""Files written whole or not at all: a temporary name, then a rename; a full disk is named as such."""
from __future__ import annotations

import errno
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
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in str(exc):
            raise DiskFullError(f"disk full (ENOSPC) while saving {path}: free space, then resume") from None
        raise
    tmp.replace(path)
    return path
