"""Jobs on a Ray cluster. Each job gets a detached host actor (no CPU of its own, on the submitting node when it can)
that owns the job's task and keeps the task's events; whoever looks at the workspace (dashboard, CLI) drains them into
the store, which stays the one record the dashboard reads. Restarting the dashboard finds the hosts by job id.

A task killed or a node lost fails the job with the reason; resume runs it again from its last epoch checkpoint in
the run folder (under `--artifacts`, a folder every node reaches).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Iterator

from ...errors import SospError
from ...progress import Cancelled
from ..store import Store, StoreError
from ..work import STUDY_KINDS, LogLines, execute, record_outputs, throttled

NAMESPACE = "sosp-lab"
DRAIN_TIMEOUT_SECONDS = 30.0
PROGRESS_EVERY_SECONDS = 0.5
_connected: dict[str, str] = {}


class BackendError(SospError):
    """The Ray cluster cannot be used: Ray missing, no address, cluster unreachable, resources it does not have."""


def _ray():
    try:
        import ray
    except ImportError:
        raise BackendError(
            "the ray backend needs Ray: pip install -r requirements-cluster.txt (on every node)"
        ) from None
    return ray


def connect(address: str):
    """Connect this process to the cluster at `address` (once; switching clusters reconnects); the engine's code
    travels to the workers with the jobs."""
    ray = _ray()
    if not address:
        raise BackendError(
            "give the Ray cluster's address: --ray-address HOST:PORT, or $SOSP_RAY_ADDRESS ('auto' finds "
            "a cluster started on this machine with `ray start --head`)"
        )
    if ray.is_initialized() and _connected.get("address") == address:
        return ray
    _check_reachable(address)
    if ray.is_initialized():  # another cluster: its jobs' hosts are detached and keep running meanwhile
        ray.shutdown()
    package = str(Path(__file__).resolve().parent)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.ERROR,
            runtime_env={"py_modules": [package]},
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BackendError(
            f"cannot reach the Ray cluster at '{address}' ({str(exc).splitlines()[0]}); start it with "
            "`ray start --head` and check the address"
        ) from None
    _connected["address"] = address
    return ray


def _check_reachable(address: str) -> None:
    """HOST:PORT must accept a connection now (Ray itself would retry for minutes before it says so)."""
    host, _, port = address.rpartition(":")
    if address == "auto" or not port.isdigit():
        return
    try:
        socket.create_connection((host.removeprefix("ray://") or "127.0.0.1", int(port)), timeout=3).close()
    except OSError as exc:
        raise BackendError(
            f"cannot reach the Ray cluster at '{address}' ({exc.strerror or exc}); start it with "
            "`ray start --head` and check the address"
        ) from None


def host_name(job_id: str) -> str:
    return f"job-{job_id}"


def resources(ray, config: dict) -> dict:
    """What one unit of a job needs: `nproc` GPUs when it may use CUDA and the cluster has GPUs, else `nproc` CPUs."""
    nproc, device = int(config.get("nproc", 1)), str(config.get("device", "auto"))
    gpus = ray.cluster_resources().get("GPU", 0)
    if device.startswith("cuda") and not gpus:
        raise BackendError(
            f"the job asks for {device} but the Ray cluster has no GPUs; use --device cpu or auto"
        )
    if device != "cpu" and gpus:
        return {"num_gpus": nproc, "num_cpus": 1}
    return {"num_cpus": nproc, "num_gpus": 0}


@functools.cache
def _host_class():
    ray = _ray()

    @ray.remote(num_cpus=0, max_restarts=0)
    class JobHost:
        """Owns one job's task and keeps its events (numbered) until the workspace side acknowledges them."""

        def __init__(self, job: dict, needs: dict, unit_needs: dict) -> None:
            self.lock = threading.Lock()
            self.events: list[tuple[int, str, object]] = []
            self.seq, self.stop, self.finished = 0, False, False
            self.latest: tuple[float, str] | None = None
            self.beat = time.time()
            me = ray.get_runtime_context().current_actor
            self.ref = ray.remote(run_remote_job).options(**needs, max_retries=0).remote(job, me, unit_needs)
            threading.Thread(target=self._watch, daemon=True).start()

        def _add(self, kind: str, payload: object) -> None:
            with self.lock:
                self.seq += 1
                self.events.append((self.seq, kind, payload))
                self.beat = time.time()

        def push(self, kind: str, payload: object) -> bool:
            self._add(kind, payload)
            return True

        def progress(self, fraction: float, message: str) -> None:
            self.latest, self.beat = (fraction, message), time.time()

        def stop_requested(self) -> bool:
            return self.stop

        def drain(self, acknowledged: int, cancel: bool) -> dict:
            self.stop = self.stop or cancel
            with self.lock:
                self.events = [e for e in self.events if e[0] > acknowledged]
                return {
                    "events": list(self.events),
                    "progress": self.latest,
                    "beat": self.beat,
                    "finished": self.finished,
                }

        def _watch(self) -> None:
            try:
                outcome = ray.get(self.ref)
            except Exception as exc:  # the worker or its node died: the task cannot report this itself
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                outcome = {
                    "status": "failed",
                    "error": f"the Ray worker running the job was lost ({type(exc).__name__}"
                    f"{': ' + first if first else ''}); resume it to continue "
                    "from its last epoch checkpoint",
                }
            self._add("end", outcome)
            self.finished = True

    return JobHost


def run_remote_job(job: dict, host, unit_needs: dict) -> dict:
    """The body of a job on a cluster worker: the same work as a local job, its events sent to the job's host; a
    study's units run as parallel tasks of `unit_needs` each."""
    import ray

    ray.get(
        host.push.remote(
            "start",
            {"node": f"{socket.gethostname()} ({ray.util.get_node_ip_address()})", "pid": os.getpid()},
        )
    )
    log = LogLines(lambda line: host.push.remote("log", line))
    last = [0.0]

    def report(fraction: float, message: str, metrics: dict | None) -> None:
        if metrics is not None:  # delivered before the epoch's checkpoint is written: a kill never loses it
            ray.get(host.push.remote("metrics", metrics))
        now = time.time()
        if metrics is not None or now - last[0] > PROGRESS_EVERY_SECONDS or fraction >= 1.0:
            host.progress.remote(fraction, message)
            last[0] = now
        log(fraction, message, metrics is not None)

    should_stop = throttled(lambda: ray.get(host.stop_requested.remote()))
    try:
        outcome = {
            "status": "done",
            "result": execute(job, report, should_stop, fan_out=ray_fan_out(unit_needs, host)),
        }
    except Cancelled as exc:
        outcome = {"status": "cancelled", "message": str(exc)}
    except Exception as exc:
        host.push.remote("log", traceback.format_exc())
        outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    ray.get(
        host.push.remote("log", f"[{time.strftime('%H:%M:%S')}] {outcome['status']}")
    )  # after every earlier push
    return outcome


def run_unit_reporting(runner, config: dict, folder: str, unit: tuple, host) -> dict:
    """A study's unit on a cluster worker (`runner`: the study kind's `run_unit`); its epoch metrics go to the job's
    host."""
    import ray

    def report(fraction: float, message: str, metrics: dict | None) -> None:
        if metrics is not None:
            ray.get(host.push.remote("metrics", metrics))

    return runner(config, folder, unit, report)


def ray_fan_out(needs: dict, host):
    """A study's units as parallel tasks (each with the job's resources), yielded as they finish; stop cancels
    the rest."""
    import ray

    def fan_out(runner, config: dict, folder: str, units: list, should_stop) -> Iterator[tuple[tuple, dict]]:
        task = ray.remote(run_unit_reporting).options(**needs, max_retries=0)
        pending = {task.remote(runner, config, folder, unit, host): unit for unit in units}
        try:
            while pending:
                if should_stop is not None and should_stop():
                    raise Cancelled(f"cancelled with {len(pending)} units unfinished; resume to run them")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    unit = pending.pop(ref)
                    yield unit, ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    return fan_out


def start_job(store: Store, job: dict) -> None:
    """Hand a claimed job to the cluster: a fresh host actor named after the job starts its task."""
    ray = connect(job["address"])
    unit_needs = resources(ray, job["config"])
    needs = (
        {"num_cpus": 0, "num_gpus": 0} if job["kind"] in STUDY_KINDS else unit_needs
    )  # a study hands out units
    name = host_name(job["id"])
    _kill_host(ray, name)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    _host_class().options(
        name=name, namespace=NAMESPACE, lifetime="detached", scheduling_strategy=here
    ).remote(job, needs, unit_needs)
    store.update_job(
        job["id"], heartbeat=time.time(), message=f"waiting for the cluster ({_describe(unit_needs)})"
    )


def _describe(needs: dict) -> str:
    return f"{needs['num_gpus']} GPU" if needs.get("num_gpus") else f"{needs['num_cpus']} CPU"


def _kill_host(ray, name: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass


def release(job: dict) -> None:
    """Before a resume: refuse while the job's task still runs on the cluster, else remove its old host."""
    ray = connect(job["address"])
    try:
        host = ray.get_actor(host_name(job["id"]), namespace=NAMESPACE)
    except ValueError:
        return
    try:
        finished = ray.get(host.drain.remote(1 << 62, False), timeout=DRAIN_TIMEOUT_SECONDS)["finished"]
    except Exception:  # a dead or unreachable host runs nothing
        finished = True
    if not finished:
        raise StoreError(
            f"job '{job['id']}' still runs on the Ray cluster: cancel it and wait until it stops"
        )
    ray.kill(host)


def sync(store: Store) -> list[str]:
    """Drain the events of every active cluster job into the store; returns the jobs found lost (now failed)."""
    return [
        job["id"]
        for job in store.jobs("running") + store.jobs("starting")
        if job["backend"] == "ray" and _sync_job(store, job)
    ]


def _fail(store: Store, job: dict, reason: str) -> bool:
    store.update_job(job["id"], status="failed", finished=time.time(), error=reason)
    return True


def _sync_job(store: Store, job: dict) -> bool:
    """Apply the job's new events; True when the job was found lost (its worker, host or node gone)."""
    ray = connect(job["address"])
    try:
        host = ray.get_actor(host_name(job["id"]), namespace=NAMESPACE)
    except ValueError:
        if job["status"] == "starting" and time.time() - (job.get("heartbeat") or job["created"]) < 10:
            return False  # being handed to the cluster right now
        return _fail(
            store,
            job,
            "the job's Ray host is gone (its node was lost or the cluster restarted); resume it "
            "to run it again from its last epoch checkpoint",
        )
    try:
        batch = ray.get(
            host.drain.remote(job["remote_seq"], bool(job["cancel_requested"])), timeout=DRAIN_TIMEOUT_SECONDS
        )
    except ray.exceptions.GetTimeoutError:
        return False  # busy; the next look will drain
    except ray.exceptions.RayError as exc:
        return _fail(
            store,
            job,
            f"the job's Ray host was lost ({type(exc).__name__}); resume it to run it again "
            "from its last epoch checkpoint",
        )
    fields: dict = {"heartbeat": batch["beat"]}
    if batch["progress"] is not None:
        fields.update(progress=batch["progress"][0], message=batch["progress"][1])
    metrics, lines, outcome = [], [], None
    for _, kind, payload in batch["events"]:
        if kind == "start":
            fields.update(
                status="running",
                node=payload["node"],
                pid=payload["pid"],
                started=job.get("started") or time.time(),
            )
        elif kind == "metrics":
            metrics.append((payload.get("stage", ""), int(payload.get("epoch", 0)), payload))
        elif kind == "log":
            lines.append(payload)
        elif kind == "end":
            outcome = payload
    if outcome is not None:
        fields.update(_final_fields(outcome))
    if not batch["events"]:
        store.update_job(job["id"], **fields)
        return False
    if not store.apply_remote_events(job["id"], batch["events"][-1][0], metrics, fields):
        return False  # another drainer applied them
    if lines:
        with open(Path(job["path"]) / "job.log", "a") as fh:
            fh.write("\n".join(lines) + "\n")
    if outcome is not None:
        if outcome["status"] == "done":
            record_outputs(store, job, outcome["result"])
        ray.kill(host)
    return outcome is not None and outcome["status"] == "failed" and "was lost" in outcome["error"]


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


def cluster_summary(address: str) -> dict:
    """Nodes, CPUs and GPUs of the cluster at `address` (what the Runs page shows before jobs go there)."""
    ray = connect(address)
    total = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "nodes": len(alive),
        "cpus": int(total.get("CPU", 0)),
        "gpus": int(total.get("GPU", 0)),
        "addresses": sorted({n.get("NodeManagerAddress", "") for n in alive}),
    }
