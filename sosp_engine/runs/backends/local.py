"""The local backend: a job runs as its own OS process (`python -m sosp_engine run-job ID`), so closing the UI never
stops it; a process that ends without recording an outcome fails its job at once, with its exit code."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..store import Store, StoreError
from ..work import LOG_NAME, failure_in_log, read_log

PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding sosp_engine/


def start_job(store: Store, job: dict) -> None:
    """Start a claimed job's runner process; its output goes to the job's log."""
    log = open(Path(job["path"]) / LOG_NAME, "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sosp_engine", "run-job", job["id"], "--workspace", str(store.root)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
        cwd=PACKAGE_ROOT,
    )
    store.update_job(job["id"], pid=proc.pid, heartbeat=time.time())
    threading.Thread(target=_reap, args=(store, job["id"], proc), daemon=True).start()


def _reap(store: Store, job_id: str, proc: subprocess.Popen) -> None:
    """Wait for a job's process (no zombie under the UI); one that ended without recording an outcome (killed,
    crashed on start) fails its job now, with the exit code and the log's last line, not after the stale timeout."""
    code = proc.wait()
    try:
        job = store.job(job_id)
        if job["status"] in ("starting", "running") and job.get("pid") == proc.pid:
            last = failure_in_log(store, job_id) or (read_log(store, job_id, tail=1) or "no output").strip()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            store.update_job(
                job_id,
                status="failed",
                finished=time.time(),
                error=f"the job's process {how} before it recorded an outcome (last log line: {last}); "
                "resume it to continue from its last checkpoint",
            )
    except (
        StoreError,
        OSError,
        sqlite3.Error,
    ):  # the workspace went away meanwhile: the stale check covers it
        pass
