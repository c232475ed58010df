"""Files written whole or not at all, and read back only as written: a temporary name then a rename, a checksum beside
each file, the previous version kept where a resume needs one; a full disk or a file size limit is named as such."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import resource
import shutil
import stat
import sys
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from .errors import CheckpointError, SospError

CHECKSUM_SUFFIX = ".sha256"
PREVIOUS_SUFFIX = ".prev"
MAX_EXPANSION = 20  # declared bytes per stored byte; torch.save stores tensors uncompressed (about 1x)
FULL_BELOW_BYTES = 1 << 20
MAX_JSON_FILE_BYTES = 64 << 20  # a state or analysis file of the project's own


class WriteError(SospError, OSError):
    """A file could not be written (nothing half-written is left behind); the message names the file."""


class DiskFullError(WriteError):
    """The disk filled up while an artifact was written (nothing half-written is left behind)."""


class NotAFileError(SospError, OSError):
    """A path that should hold a file is a FIFO, a device, a socket or a folder; it is named, never opened."""


_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for reading when it is a regular file (links followed); anything else is refused by name. The
    open itself never waits: it does not block on a FIFO that was swapped in after any earlier check."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except IsADirectoryError:
        raise NotAFileError(f"'{path}' is a folder, not a file") from None
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise NotAFileError(
                f"'{path}' is {_KINDS.get(kind, 'not a regular file')}, not a file: give a file"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (see open_regular); a larger one is refused unread."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise SospError(
                f"'{path}' is {size:,} bytes, more than the {limit:,} such a file can need; it was not read"
            )
        return fh.read(limit + 1)[:limit]


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomically(path: str | Path, value: object) -> None:
    """`value` as JSON at `path`, whole or not at all (a reader never sees half a file; writers do not collide)."""
    text = json.dumps(value, indent=1).encode()
    _write_whole(Path(path), lambda fh: fh.write(text))


def write_bytes_atomically(path: str | Path, data: bytes) -> Path:
    """`data` at `path`, whole or not at all (its folder is made where missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_whole(path, lambda fh: fh.write(data))


def write_text_atomically(path: str | Path, text: str) -> Path:
    """`text` at `path`, whole or not at all (its folder is made where missing)."""
    return write_bytes_atomically(path, text.encode())


def _write_whole(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """`write` into a temporary file beside `path`, then rename it there; on a failure the partial file is removed
    and the error names `path` (the name the user gave), never the temporary one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise _write_error(exc, path, tmp) from None
    return path


def read_json(path: str | Path) -> dict:
    """The JSON object `write_json_atomically` wrote at `path`, or {} where there is none (yet) or it is not one."""
    try:
        value = json.loads(read_regular(path, MAX_JSON_FILE_BYTES))
    except (OSError, ValueError, RecursionError, SospError):
        return {}
    return value if isinstance(value, dict) else {}


def save_atomically(obj: object, path: str | Path, keep_previous: bool = False) -> Path:
    """torch.save to a temporary name, then rename: readers see the old file or the new one, never half of one.

    The file's SHA-256 is written beside it (`NAME.sha256`) and checked by `load_verified`; with `keep_previous`,
    the file it replaces stays as `NAME.prev` (with its checksum), for a resume when the newest is damaged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(
            tmp, "wb"
        ) as fh:  # closed on any error, so removing the partial file frees its space at once
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        checksum_tmp = checksum_path(tmp)
        checksum_tmp.write_text(file_digest(tmp) + "\n")
    except (OSError, RuntimeError) as exc:
        raise _write_error(exc, path, tmp) from None
    if keep_previous and path.is_file():
        path.replace(previous_path(path))
        if checksum_path(path).is_file():
            checksum_path(path).replace(checksum_path(previous_path(path)))
    tmp.replace(path)
    checksum_tmp.replace(checksum_path(path))
    return path


def finish_interrupted_save(path: str | Path) -> None:
    """Bring a `save_atomically` that was killed between its steps to an end, from whichever state it left: a
    temporary file whose checksum matches is the newest whole checkpoint and takes its place; a checksum left beside
    no file goes with the file it belongs to; a partial temporary file is removed."""
    path = Path(path)
    tmp, previous = path.with_name(path.name + ".tmp"), previous_path(path)
    tmp_sum = checksum_path(tmp)
    if not path.is_file() and previous.is_file() and _matches(previous, checksum_path(path)):
        checksum_path(path).replace(
            checksum_path(previous)
        )  # killed between moving the file and its checksum aside
    if tmp.is_file() and _matches(tmp, tmp_sum):
        if path.is_file() and checksum_path(path).is_file():
            path.replace(previous)
            checksum_path(path).replace(checksum_path(previous))
        tmp.replace(path)
    if tmp_sum.is_file() and path.is_file() and not checksum_path(path).is_file() and _matches(path, tmp_sum):
        tmp_sum.replace(checksum_path(path))  # killed between renaming the file and its checksum
    for partial in (tmp, tmp_sum):
        partial.unlink(missing_ok=True)


def _matches(path: Path, checksum: Path) -> bool:
    try:
        return checksum.is_file() and read_regular(checksum, 200).decode().strip() == file_digest(path)
    except (OSError, SospError, UnicodeDecodeError):
        return False


def _write_error(exc: Exception, path: Path, tmp: Path) -> Exception:
    """The error to raise for a failed write, after removing the partial file: a full disk and a file size limit are
    said in words (torch's zip writer reports both as "unexpected pos ...")."""
    written = tmp.stat().st_size if tmp.exists() else 0
    for partial in (tmp, checksum_path(tmp)):
        partial.unlink(missing_ok=True)
    if _disk_full(exc, path.parent):
        return DiskFullError(f"disk full (ENOSPC) while saving {path}: free space, then resume")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if (isinstance(exc, OSError) and exc.errno == errno.EFBIG) or (
        limit != resource.RLIM_INFINITY and written + (1 << 20) >= limit
    ):
        return SospError(
            f"the file size limit (ulimit -f: {limit:,} bytes) stopped writing {path} after "
            f"{written:,} bytes: raise it (ulimit -f unlimited), then resume"
        )
    return WriteError(f"cannot write '{path}': {_reason(exc)}")


def _reason(exc: Exception) -> str:
    if isinstance(exc, IsADirectoryError):
        return "it is a folder; give a file name"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _disk_full(exc: Exception, folder: Path) -> bool:
    """Whether a failed write ran out of space: the error says so, or the disk has (almost) nothing left."""
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False


def check_declared_size(path: Path, budget: int) -> None:
    """Refuse a torch file whose zip directory declares more bytes than it could hold or than `budget` (a zip bomb
    takes gigabytes to unpack from a megabyte); read before anything is unpacked."""
    with open_regular(path) as fh:
        if not zipfile.is_zipfile(fh):
            return
        try:
            with zipfile.ZipFile(fh) as archive:
                declared = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(
                f"'{path}' is a damaged zip archive ({exc}); it is not a loadable torch file"
            ) from None
        stored = os.fstat(fh.fileno()).st_size
    if declared > MAX_EXPANSION * stored + (1 << 20):
        raise CheckpointError(
            f"'{path}' declares {declared:,} bytes unpacked from {stored:,} on disk (more than "
            f"{MAX_EXPANSION}x): a torch checkpoint is stored uncompressed, so this is no checkpoint "
            "of ours and was not unpacked"
        )
    if declared > budget:
        raise CheckpointError(
            f"'{path}' unpacks to {declared:,} bytes, more than the {budget:,} bytes of memory "
            "available: free memory or use a machine with more"
        )


def verify_checksum(path: Path) -> None:
    """Compare a file with the checksum written beside it, if there is one (files from elsewhere have none)."""
    recorded = checksum_path(path)
    if not recorded.is_file():
        return
    try:
        expected = read_regular(recorded, 200).decode(errors="replace").strip()
    except SospError as exc:
        raise CheckpointError(f"the checksum file beside '{path}' cannot be read: {exc}") from None
    if file_digest(path) != expected:
        raise CheckpointError(
            f"'{path}' does not match the checksum recorded when it was written ({recorded}): it "
            "was changed or damaged on disk. Restore it from a copy, or delete it (and its "
            ".sha256) to redo the work that wrote it"
        )


def load_verified(
    path: str | Path, map_location: str | torch.device = "cpu", budget: int | None = None
) -> object:
    """torch.load with weights_only=True, after the size and checksum checks; a failure names the file."""
    path = Path(path)
    if budget is None:
        from .devices import available_memory

        budget = available_memory(torch.device("cpu"))
    check_declared_size(path, budget)
    verify_checksum(path)
    try:
        with open_regular(path) as fh:
            return torch.load(fh, map_location=map_location, weights_only=True)
    except (FileNotFoundError, NotAFileError):
        raise
    except pickle.UnpicklingError as exc:
        if "This file can still be loaded" not in str(exc):  # torch's words for a pickle it read but refused
            raise CheckpointError(
                f"'{path}' is not a file torch.load can read (not a torch checkpoint, or a damaged one)"
            ) from None
        raise CheckpointError(
            f"'{path}' holds Python objects besides tensors (a whole pickled model?), which loading with "
            "weights_only=True refuses because unpickling them could run code; save the weights file with "
            "torch.save(model.state_dict(), path)"
        ) from None
    except Exception:
        raise CheckpointError(
            f"'{path}' is not a file torch.load can read (not a torch checkpoint, or a damaged one)"
        ) from None


def load_with_fallback(path: str | Path, map_location: str | torch.device = "cpu") -> object:
    """A resume checkpoint, or the one before it when the newest is damaged; both bad: an error naming them."""
    path = Path(path)
    try:
        return load_verified(path, map_location)
    except (CheckpointError, FileNotFoundError) as newest:  # missing: a kill left only the one before it
        previous = previous_path(path)
        if not previous.is_file():
            raise CheckpointError(
                f"{newest} No earlier checkpoint is kept; delete '{path}' to restart this stage "
                "from its first epoch"
            ) from None
        try:
            state = load_verified(previous, map_location)
        except CheckpointError as older:
            raise CheckpointError(
                f"{newest} The one before it is damaged too: {older} Delete both to restart this "
                "stage from its first epoch"
            ) from None
        print(
            f"warning: {newest} Resuming from the checkpoint before it, {previous}.",
            file=sys.stderr,
            flush=True,
        )
        return state
