"""The Ray backend as the workspace sees it. What a cluster job produces lies in its run folder on the shared
artifacts storage (event files, live progress, its host's heartbeat; see ray_cluster.py), so keeping the store up
to date reads files and needs no connection; Ray itself is asked, through the bridge (ray_bridge.py), only to start,
release or probe, and when a job's heartbeat stops.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ...atomic import read_json
from ..events import new_events
from ..store import Store, StoreError, event_offsets, run_folder
from ..work import LOG_NAME, record_outputs
from .ray_bridge import call
from .ray_cluster import (
    CANCEL_FILE,
    HOST_BEAT_SECONDS,
    HOST_FILE,
    PROGRESS_FILE,
    BackendError,
    require_address,
)

MAX_RETRIES_ENV = "SOSP_RAY_MAX_RETRIES"
DEFAULT_MAX_RETRIES = 2
HOST_STALE_SECONDS = 15 * HOST_BEAT_SECONDS  # no heartbeat for this long: the cluster is asked about the job
__all__ = ["BackendError", "check_storage", "cluster_summary", "release", "start_job", "sync"]


def max_retries() -> int:
    """How often Ray runs a task again whose worker or node was lost: $SOSP_RAY_MAX_RETRIES, default 2."""
    value = os.environ.get(MAX_RETRIES_ENV, str(DEFAULT_MAX_RETRIES))
    if not value.isdigit():
        raise BackendError(f"${MAX_RETRIES_ENV} must be a whole number >= 0, not '{value}'")
    return int(value)


def cluster_summary(address: str) -> dict:
    """Nodes, CPUs and GPUs of the cluster at `address` (reaching it proves the address)."""
    require_address(address)
    return call("cluster_summary", address)


def check_storage(address: str, folder: str, paths: list[str]) -> None:
    """Refuse a job unless every node of the cluster shares `folder` (where its run folder goes) with this machine
    and sees each of `paths` (data, weights, model files) at the same path."""
    problems = call("storage_reach", address, folder, paths)
    if problems:
        raise BackendError(
            "the job's files are not reachable from every node of the Ray cluster: "
            + "; ".join(problems[:4])
            + ("; ..." if len(problems) > 4 else "")
            + ". Give --artifacts a folder every node mounts at the same path (NFS, a shared disk), and put data, "
            "weights and model files there too"
        )


def start_job(store: Store, job: dict) -> None:
    """Hand a claimed job to the cluster: a fresh host actor named after the job starts its task."""
    _clear_live_files(run_folder(job))
    message = call("start_job", job, max_retries())
    store.update_job(job["id"], heartbeat=time.time(), message=message)


def release(job: dict) -> None:
    """Before a resume: refuse while the job's task still runs on the cluster, else remove its old host."""
    why = call("release", job)
    if why:
        raise StoreError(why)


def _clear_live_files(folder: Path) -> None:
    """A new start reads no progress, heartbeat or cancel request of the run before."""
    for name in (PROGRESS_FILE, HOST_FILE, CANCEL_FILE):
        (folder / name).unlink(missing_ok=True)


def sync(store: Store) -> list[str]:
    """Bring every active cluster job's record up to date from its run folder; returns the jobs found lost (now
    failed, with every epoch they finished kept)."""
    return [
        job["id"]
        for job in store.jobs("running") + store.jobs("starting")
        if job["backend"] == "ray" and _sync_job(store, job)
    ]


def ingest(store: Store, job: dict) -> dict | None:
    """Apply the job's event lines not yet in the store; returns the outcome when the job's end was among them."""
    read_from = event_offsets(job)
    events, read_to = new_events(run_folder(job), read_from)
    if read_to == read_from:
        return None
    fields: dict = {}
    metrics, lines, outcome = [], [], None
    for event in events:
        kind, payload = event.get("kind"), event.get("payload")
        if kind == "start":
            fields.update(
                status="running",
                node=payload["node"],
                pid=payload["pid"],
                started=job.get("started") or event["time"],
            )
        elif kind == "metrics":
            metrics.append((payload.get("stage", ""), int(payload.get("epoch", 0)), payload))
        elif kind == "log":
            lines.append(payload)
        elif kind == "unit-start":
            at = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            lines.append(f"[{at}] unit {'/'.join(map(str, payload['unit']))} started on {payload['node']}")
        elif kind == "end" and outcome is None:  # the task's own outcome wins over its host's
            outcome = payload
    if outcome is not None:
        fields.update(_final_fields(outcome))
    if not store.apply_remote_events(job["id"], read_from, read_to, metrics, fields):
        return None  # another reader applied them
    if lines:
        with open(Path(job["path"]) / LOG_NAME, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    if outcome is not None and outcome["status"] == "done":
        record_outputs(store, job, outcome["result"])
    return outcome


def _lost(outcome: dict | None) -> bool:
    return outcome is not None and outcome["status"] == "failed" and "was lost" in outcome["error"]


def _sync_job(store: Store, job: dict) -> bool:
    """Ingest the job's events and live files; True when the job was found lost (its host or node gone)."""
    outcome = ingest(store, job)
    if outcome is not None:
        return _lost(outcome)
    job = store.job(job["id"])
    if job["status"] not in ("running", "starting"):
        return False
    folder = run_folder(job)
    if job["cancel_requested"] and folder.is_dir():
        (folder / CANCEL_FILE).touch()
    progress, host = read_json(folder / PROGRESS_FILE), read_json(folder / HOST_FILE)
    fields: dict = {}
    if "fraction" in progress and job["status"] == "running":
        fields.update(progress=float(progress["fraction"]), message=str(progress.get("message", "")))
    beat = float(host.get("beat") or 0.0)
    if beat > (job.get("heartbeat") or 0.0):
        fields["heartbeat"] = beat
    if fields:
        store.update_job(job["id"], **fields)
    last_sign = max(beat, job.get("heartbeat") or job["created"])
    if not host.get("finished") and time.time() - last_sign < HOST_STALE_SECONDS:
        return False
    state = call("host_state", job["address"], job["id"])  # silent or finished: ask the cluster
    outcome = ingest(store, store.job(job["id"]))
    if outcome is not None or state == "running":
        return _lost(outcome)
    what = (
        "the job's task ended but its outcome never reached the shared storage"
        if state == "finished"
        else "the job's Ray host is gone (its node was lost or the cluster restarted)"
    )
    store.update_job(
        job["id"],
        status="failed",
        finished=time.time(),
        error=f"{what}; every epoch it finished is kept: resume it to run it again from its last epoch "
        "checkpoint",
    )
    return True


def _final_fields(outcome: dict) -> dict:
    now = time.time()
    if outcome["status"] == "done":
        return {
            "status": "done",
            "finished": now,
            "progress": 1.0,
            "message": "done",
            "result": outcome["result"],
        }
    if outcome["status"] == "cancelled":
        return {"status": "cancelled", "finished": now, "message": outcome["message"]}
    return {"status": "failed", "finished": now, "error": outcome["error"]}
