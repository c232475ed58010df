"""The user's consent to run the code a model spec names, signed with a key outside the workspace.

A stored job is data: anybody who can edit the workspace's database can rewrite its model spec. Consent is therefore
an HMAC of the very spec the user confirmed, under a key in the user's own configuration folder, so an edited spec
(or a workspace from somewhere else) carries no consent and runs nothing until the user confirms it again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
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
    path = key_path()
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = _new_key(path)
    except OSError as exc:
        raise ModelSpecError(
            f"cannot read the consent key '{path}' ({exc.strerror or exc}); user code cannot be "
            "confirmed until it is readable"
        ) from None
    if len(key) < KEY_BYTES:  # damaged or someone else's: never overwritten silently
        raise ModelSpecError(
            f"the consent key '{path}' is shorter than {KEY_BYTES} bytes: remove it so a new one is "
            "made (earlier confirmations then need to be given again)"
        )
    return key


def _new_key(path: Path) -> bytes:
    """A fresh random key, readable by this user only (a key another process wrote first wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
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
