"""Ray's client aborts its whole process (a failed C++ check in `global_state_accessor.h`) when it calls a cluster
that restarted under it; that took the dashboard down with it. So the workspace side (dashboard, CLI, tests) never
connects to Ray itself: each call goes to one child process that holds the connection. An abort ends only the
child; the call is tried once more in a fresh child, which connects anew, and otherwise fails with the reason.

    python -m sosp_engine.runs.backends.ray_bridge    # the child: one JSON request per line in, one reply out
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

from ...errors import SospError
from ..store import StoreError
from . import ray_cluster
from .ray_cluster import BackendError

PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding sosp_engine/
OPERATIONS = ("start_job", "release", "host_state", "cluster_summary", "storage_reach")
ERRORS = {"BackendError": BackendError, "StoreError": StoreError, "SospError": SospError}
TIMEOUT_SECONDS = {"start_job": 300.0, "storage_reach": 300.0}
DEFAULT_TIMEOUT_SECONDS = 120.0


class _Child:
    """The one child process holding this process's Ray connection, started on first use and after it dies."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _started(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            env = dict(os.environ)
            env["PYTHONPATH"] = str(PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sosp_engine.runs.backends.ray_bridge"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=PACKAGE_ROOT,
            )
        return self.proc

    def _discard(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def ask(self, request: str, timeout: float) -> str:
        """The child's reply line to `request`, or '' when the child died or stayed silent past `timeout`."""
        proc = self._started()
        try:
            proc.stdin.write(request + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._discard()
            return ""
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            self._discard()
        return line


_child = _Child()


def call(operation: str, *args: object) -> object:
    """Run `ray_cluster.<operation>(*args)` in the bridge's child and return its value or raise its error."""
    timeout = TIMEOUT_SECONDS.get(operation, DEFAULT_TIMEOUT_SECONDS)
    request = json.dumps([operation, args])
    with _child.lock:
        line = _child.ask(request, timeout) or _child.ask(request, timeout)  # a fresh child reconnects
    if not line:
        raise BackendError(
            f"the connection to the Ray cluster broke ({operation} got no answer in {timeout:.0f} s, twice, from a "
            "fresh connection); check that the cluster runs (`ray status`) and try again"
        )
    reply = json.loads(line)
    if "error" in reply:
        raise ERRORS.get(reply["type"], BackendError)(reply["error"])
    return reply["value"]


def _serve() -> None:
    """The child: answer one JSON request per line on stdin until it closes; anything Ray prints goes to stderr."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        operation, args = json.loads(line)
        try:
            if operation not in OPERATIONS:
                raise BackendError(f"the Ray bridge has no operation '{operation}'")
            reply = {"value": getattr(ray_cluster, operation)(*args)}
        except SospError as exc:
            kind = type(exc).__name__
            reply = {"error": str(exc), "type": kind if kind in ERRORS else "SospError"}
        except Exception as exc:  # whatever Ray raises: reported, and the child goes on serving
            reply = {"error": f"{type(exc).__name__}: {exc}", "type": "BackendError"}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    _serve()
