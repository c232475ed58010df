"""The user's consent to run the code a model spec names, signed with a key outside the workspace.

A stored job is data: anybody who can edit the workspace's database can rewrite its model spec. Consent is therefore
an HMAC of the very spec the user confirmed, under a key in the user's own configuration folder, so an edited spec
(or a workspace from somewhere else) carries no consent and runs nothing until the user confirms it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from pathlib import Path

from ..errors import ModelSpecError
from ..nets.setup import stored_setup
from ..nets import is_user_code

KEY_ENV = "SOSP_CONSENT_KEY"  # a file holding the key, for tests and shared accounts
KEY_BYTES = 32


def key_path() -> Path:
    """`$SOSP_CONSENT_KEY`, else `$XDG_CONFIG_HOME/sosp-lab/consent.key` (default ~/.config)."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "sosp-lab" / "consent.key"


def _key() -> bytes:
    """The user's key, created whole on first use; a key that anyone else could have written or read is refused."""
    path = key_path()
    _check_folder(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return _new_key(path)
    except OSError as exc:
        if os.path.islink(path):
            raise _refused(path, "is a symbolic link") from None
        raise ModelSpecError(
            f"cannot read the consent key '{path}' ({exc.strerror or exc}); user code cannot be "
            "confirmed until it is readable"
        ) from None
    try:
        _check_key_file(path, os.fstat(fd))
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:  # damaged or someone else's: never overwritten silently
        raise ModelSpecError(
            f"the consent key '{path}' holds {len(key)} bytes, not {KEY_BYTES}: it is damaged or not a key of "
            "SOSP Lab. Remove it so a new one is made (earlier confirmations then need to be given again)"
        )
    return key


def _refused(path: Path, why: str) -> ModelSpecError:
    return ModelSpecError(
        f"the consent key '{path}' {why}, so another user could have written or read it; it is not used. "
        f"Remove it (a new key is made, earlier confirmations need to be given again) or point ${KEY_ENV} at a "
        "key file of your own, mode 0600, in a folder only you can write"
    )


def _check_key_file(path: Path, info: os.stat_result) -> None:
    """A key is a regular file of this user that nobody else may read or write (mode 0600)."""
    if not stat.S_ISREG(info.st_mode):
        raise _refused(path, "is not a regular file")
    if info.st_uid != os.geteuid():
        raise _refused(path, f"belongs to user id {info.st_uid}, not to you ({os.geteuid()})")
    if info.st_mode & 0o077:
        raise _refused(
            path, f"has mode {stat.S_IMODE(info.st_mode):04o} (group or others may use it; want 0600)"
        )


def _check_folder(folder: Path) -> None:
    """The key's folder exists (created 0700) and only this user can write into it (no one can swap the key)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as exc:
        raise ModelSpecError(
            f"cannot create the consent key's folder '{folder}' ({exc.strerror or exc})"
        ) from None
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ModelSpecError(
            f"the consent key's folder '{folder}' can be written by others (owner id {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):04o}): another user could replace the key. Use a folder of your own "
            f"that only you can write (chmod go-w), or point ${KEY_ENV} at a key file in one"
        )


def _new_key(path: Path) -> bytes:
    """A fresh random key, written whole to a private temporary file and then linked into place, so no process
    ever reads a half-written key; when another process linked its key first, that key wins."""
    key = secrets.token_bytes(KEY_BYTES)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".consent-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return _key()
    except OSError as exc:
        raise ModelSpecError(f"cannot write the consent key '{path}' ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    return key


def sign(model_spec: str) -> str:
    """The consent token of `model_spec`: this user confirmed that this exact spec may run its code."""
    return hmac.new(_key(), model_spec.strip().encode(), hashlib.sha256).hexdigest()


def consent_for(model_spec: str) -> str | None:
    """The token to store with a job of `model_spec` the user just confirmed (None: the spec runs no user code)."""
    return sign(model_spec) if is_user_code(model_spec) else None


def has_consent(model_spec: str, token: str | None) -> bool:
    """Whether `model_spec` may be built: it runs no user code, or `token` is this user's consent to this spec."""
    if not is_user_code(model_spec):
        return True
    return bool(token) and hmac.compare_digest(str(token), sign(model_spec))


def require_job_consent(job: dict) -> None:
    """Refuse to start a job whose stored model spec names user code the user did not confirm (as stored now)."""
    spec = stored_setup(job.get("config") or {}).model_spec
    if not has_consent(spec, job.get("consent")):
        raise ModelSpecError(
            f"job '{job['id']}' names user code '{spec}' that was not confirmed for it (the spec was "
            "changed after it was queued, or it comes from another workspace); nothing was run. "
            f"If you trust it: jobs resume {job['id']} --run-code (in the dashboard: 'Run this code')"
        )
