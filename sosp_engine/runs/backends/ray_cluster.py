"""What talks to Ray in-process: the connection, each job's host actor, the bodies of a job's and a study unit's
tasks on the workers, and the operations the bridge runs for the workspace side (start, release, summary, storage
probe, host check). Only the bridge's child process and Ray's workers run it; the workspace side takes its names
and never connects (see ray_bridge.py for why).

A job's task (and each unit's task) writes its events (start, epoch metrics, log lines, outcome) to files on the
shared artifacts storage (events.py) and its live progress to `progress.json` beside them; it polls a `cancel` file
there. The host owns the task, writes `host.json` (a heartbeat) every HOST_BEAT_SECONDS, and records a lost task's
outcome. A task whose worker or node is lost is retried ($SOSP_RAY_MAX_RETRIES, default 2) and goes on from its last
epoch checkpoint.
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
from ...nets.setup import stored_setup
from ...progress import Cancelled
from ...atomic import read_json, write_json_atomically
from ...devices import node_name
from ...experiments.ray_training import workers_of_this_job
from ..events import EventWriter
from ..store import run_folder
from ..work import STUDY_KINDS, LogLines, execute, throttled

NAMESPACE = "sosp-lab"
CALL_TIMEOUT_SECONDS = 30.0
PROGRESS_EVERY_SECONDS = 0.5
HOST_BEAT_SECONDS = 2.0
PROGRESS_FILE, HOST_FILE, CANCEL_FILE = "progress.json", "host.json", "cancel"
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
    require_address(address)
    if ray.is_initialized() and _connected.get("address") == address:
        return ray
    _check_reachable(address)
    if ray.is_initialized():  # another cluster: its jobs' hosts are detached and keep running meanwhile
        ray.shutdown()
    package = str(Path(__file__).resolve().parents[2])  # sosp_engine/
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


def require_address(address: str) -> None:
    """An empty cluster address is a clear error, before any connection is tried."""
    if not address:
        raise BackendError(
            "give the Ray cluster's address: --ray-address HOST:PORT, or $SOSP_RAY_ADDRESS ('auto' finds "
            "a cluster started on this machine with `ray start --head`)"
        )


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


def training_processes(config: dict) -> int:
    """How many processes each training of a stored job config runs across (older configs hold it flat)."""
    return int((config.get("training") or config).get("nproc", 1))


def resources(ray, job: dict) -> tuple[dict, dict]:
    """What one unit of a job needs as Ray task options (`nproc` GPUs times the GPUs per worker when it may use CUDA
    and the cluster has GPUs, else `nproc` CPUs; the accelerator type and custom resources asked for), and what each
    Ray Train worker of its trainings needs; a request no node of the cluster can meet is refused now."""
    config, asked = job["config"], job.get("resources") or {}
    nproc, device = training_processes(config), stored_setup(config).device
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0)
    if device.startswith("cuda") and not gpus:
        raise BackendError(
            f"the job asks for {device} but the Ray cluster has no GPUs; use --device cpu or auto"
        )
    accelerator, custom = asked.get("accelerator_type"), dict(asked.get("custom") or {})
    if accelerator and f"accelerator_type:{accelerator}" not in total:
        known = sorted(k.split(":", 1)[1] for k in total if k.startswith("accelerator_type:"))
        raise BackendError(
            f"no node of the Ray cluster has accelerator type '{accelerator}' (it has: {', '.join(known) or 'none'})"
        )
    missing = [name for name, amount in custom.items() if total.get(name, 0) < amount]
    if missing:
        raise BackendError(
            f"no node of the Ray cluster offers enough of the custom resource(s) {', '.join(missing)} (it has: "
            f"{', '.join(k for k in sorted(total) if k not in ('CPU', 'GPU', 'memory', 'object_store_memory'))})"
        )
    use_gpu = device != "cpu" and bool(gpus)
    per_gpu = float(asked.get("gpus_per_worker", 1.0))
    unit = {"num_gpus": nproc * per_gpu, "num_cpus": 1} if use_gpu else {"num_cpus": nproc, "num_gpus": 0}
    unit.update({"resources": custom} if custom else {})
    unit.update({"accelerator_type": accelerator} if accelerator else {})
    worker = ({"GPU": per_gpu, "CPU": 1} if use_gpu else {"CPU": 1}) | custom
    return unit, {"use_gpu": use_gpu, "resources_per_worker": worker, "accelerator_type": accelerator}


@functools.cache
def _host_class():
    ray = _ray()

    @ray.remote(num_cpus=0, max_restarts=0)
    class JobHost:
        """Owns one job's task, writes the job's heartbeat file while it lives, and records a lost task's outcome in
        the job's event files."""

        def __init__(self, job: dict, needs: dict, unit_needs: dict, workers: dict, retries: int) -> None:
            self.folder, self.retries, self.finished = run_folder(job), retries, False
            self.ref = (
                ray.remote(run_remote_job)
                .options(**needs, max_retries=retries, retry_exceptions=False)
                .remote(job, unit_needs, workers, retries)
            )
            threading.Thread(target=self._watch, daemon=True).start()
            threading.Thread(target=self._beat, daemon=True).start()

        def finished_yet(self) -> bool:
            return self.finished

        def _beat(self) -> None:
            while True:
                try:
                    self.folder.mkdir(parents=True, exist_ok=True)  # before the task starts, while it queues
                    write_json_atomically(
                        self.folder / HOST_FILE, {"beat": time.time(), "finished": self.finished}
                    )
                except OSError:
                    pass  # the workspace side sees the beat stop and asks the cluster
                time.sleep(HOST_BEAT_SECONDS)

        def _watch(self) -> None:
            try:
                ray.get(self.ref)  # the task records its own outcome
            except (
                Exception
            ) as exc:  # the worker or its node died, retries spent: the task cannot report this
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                tries = f" {self.retries + 1} times" if self.retries else ""
                EventWriter(self.folder, "host")(
                    "end",
                    {
                        "status": "failed",
                        "error": f"the Ray worker running the job was lost{tries} ({type(exc).__name__}"
                        f"{': ' + first if first else ''}); resume it to continue "
                        "from its last epoch checkpoint",
                    },
                )
            self.finished = True
            try:
                write_json_atomically(self.folder / HOST_FILE, {"beat": time.time(), "finished": True})
            except OSError:
                pass
            ray.kill(ray.get_runtime_context().current_actor)  # its work is done: a detached actor stays else

    return JobHost


def run_remote_job(job: dict, unit_needs: dict, workers: dict, retries: int = 0) -> dict:
    """The body of a job on a cluster worker: the same work as a local job, its events and live progress written to
    the job's run folder; a study's units run as parallel tasks of `unit_needs` each, and a training across
    processes on Ray Train `workers`."""

    folder = run_folder(job)
    write = EventWriter(folder, "task")
    write("start", {"node": node_name(), "pid": os.getpid()})
    log = LogLines(lambda line: write("log", line))
    last = [0.0]

    def report(fraction: float, message: str, metrics: dict | None) -> None:
        if metrics is not None:  # on disk before the epoch's checkpoint is written: a kill never loses it
            write("metrics", metrics)
        now = time.time()
        if metrics is not None or now - last[0] > PROGRESS_EVERY_SECONDS or fraction >= 1.0:
            try:
                write_json_atomically(
                    folder / PROGRESS_FILE, {"fraction": fraction, "message": message, "time": now}
                )
            except OSError:
                pass  # live progress only: the events carry what must not be lost
            last[0] = now
        log(fraction, message, metrics is not None)

    should_stop = throttled((folder / CANCEL_FILE).exists, 1.0)
    try:
        with workers_of_this_job(workers):
            result = execute(
                job, report, should_stop, fan_out=ray_fan_out(unit_needs, str(run_folder(job)), retries)
            )
        outcome = {"status": "done", "result": result}
    except Cancelled as exc:
        outcome = {"status": "cancelled", "message": str(exc)}
    except Exception as exc:
        write("log", traceback.format_exc())
        outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    write("log", f"[{time.strftime('%H:%M:%S')}] {outcome['status']}")
    write("end", outcome)
    return outcome


def run_unit_reporting(runner, config: dict, folder: str, unit: tuple, run_dir: str) -> dict:
    """A study's unit on a cluster worker (`runner`: the study kind's `run_unit`); its epoch metrics go to the job's
    event files."""
    write = EventWriter(run_dir, "unit")
    write("unit-start", {"unit": list(unit), "node": node_name(), "pid": os.getpid()})

    def report(fraction: float, message: str, metrics: dict | None) -> None:
        if metrics is not None:
            write("metrics", metrics)

    return runner(config, folder, unit, report)


def ray_fan_out(needs: dict, run_dir: str, retries: int):
    """A study's units as parallel tasks (each with the job's resources, run again where a worker is lost),
    yielded as they finish; stop cancels the rest."""
    import ray

    def fan_out(runner, config: dict, folder: str, units: list, should_stop) -> Iterator[tuple[tuple, dict]]:
        task = ray.remote(run_unit_reporting).options(**needs, max_retries=retries, retry_exceptions=False)
        pending = {task.remote(runner, config, folder, unit, run_dir): unit for unit in units}
        live = Path(run_dir) / PROGRESS_FILE

        def say_how_many() -> None:  # the study reports when a unit ends: meanwhile the page says what runs
            fraction = float(read_json(live).get("fraction", 0.0))
            message = (
                f"{len(pending)} of {len(units)} units on the cluster ({len(units) - len(pending)} done)"
            )
            try:
                write_json_atomically(live, {"fraction": fraction, "message": message, "time": time.time()})
            except OSError:
                pass

        try:
            say_how_many()
            while pending:
                if should_stop is not None and should_stop():
                    raise Cancelled(f"cancelled with {len(pending)} units unfinished; resume to run them")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    unit = pending.pop(ref)
                    yield unit, ray.get(ref)
                    say_how_many()
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    return fan_out


def start_job(job: dict, retries: int) -> str:
    """Hand a claimed job to the cluster: a fresh host actor named after the job starts its task (run again up to
    `retries` times where its worker is lost); returns what the job waits for."""
    ray = connect(job["address"])
    unit_needs, workers = resources(ray, job)
    if job["kind"] in STUDY_KINDS:
        needs = {"num_cpus": 0, "num_gpus": 0}  # a study hands out units
    elif training_processes(job["config"]) > 1:
        needs = {"num_cpus": 1, "num_gpus": 0}  # its trainings run on Ray Train workers of their own
    else:
        needs = unit_needs
    name = host_name(job["id"])
    _kill_host(ray, name)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    _host_class().options(
        name=name, namespace=NAMESPACE, lifetime="detached", scheduling_strategy=here
    ).remote(job, needs, unit_needs, workers, retries)
    return f"waiting for the cluster ({_describe(unit_needs)})"


def _describe(needs: dict) -> str:
    what = f"{needs['num_gpus']:g} GPU" if needs.get("num_gpus") else f"{needs['num_cpus']} CPU"
    if needs.get("accelerator_type"):
        what += f" of type {needs['accelerator_type']}"
    return what + "".join(f", {amount:g} {name}" for name, amount in needs.get("resources", {}).items())


def _kill_host(ray, name: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass


def release(job: dict) -> str:
    """Before a resume: '' once the job's old host is gone (removed here), or why it cannot be yet."""
    ray = connect(job["address"])
    try:
        host = ray.get_actor(host_name(job["id"]), namespace=NAMESPACE)
    except ValueError:
        return ""
    try:
        finished = ray.get(host.finished_yet.remote(), timeout=CALL_TIMEOUT_SECONDS)
    except Exception:  # a dead or unreachable host runs nothing
        finished = True
    if not finished:
        return f"job '{job['id']}' still runs on the Ray cluster: cancel it and wait until it stops"
    ray.kill(host)
    return ""


def host_state(address: str, job_id: str) -> str:
    """'running', 'finished' or 'gone': whether the job's host lives and its task has ended."""
    ray = connect(address)
    try:
        host = ray.get_actor(host_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return "gone"
    try:
        finished = ray.get(host.finished_yet.remote(), timeout=CALL_TIMEOUT_SECONDS)
    except ray.exceptions.GetTimeoutError:
        return "running"
    except ray.exceptions.RayError:
        return "gone"
    if finished:
        ray.kill(host)
    return "finished" if finished else "running"


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


def _node_sees(folder: str, token: str, node_id: str, paths: list[str]) -> dict:
    """On one node: whether it reads the token the submitter wrote in `folder`, writes its own there, and sees each
    of `paths`."""
    here = Path(folder)
    try:
        reads = (here / "probe.txt").read_text() == token
    except OSError:
        reads = False
    try:
        (here / f"node-{node_id}.txt").write_text(token)
        writes = True
    except OSError:
        writes = False
    return {
        "host": node_name(),
        "reads": reads,
        "writes": writes,
        "missing": [p for p in paths if not os.path.exists(p)],
    }


def storage_reach(address: str, folder: str, paths: list[str]) -> list[str]:
    """Run a task on every alive node that reads back a probe written in `folder` (the run folders' parent), writes
    its own, and looks for each of `paths`; returns what some node cannot reach (empty: every node reaches all)."""
    ray = connect(address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = Path(folder) / f".probe-{os.getpid()}-{time.time_ns()}"
    probe.mkdir(parents=True, exist_ok=True)
    token = os.urandom(8).hex()
    (probe / "probe.txt").write_text(token)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(_node_sees)
    try:
        reports = ray.get(
            [
                task.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
                ).remote(str(probe), token, node, paths)
                for node in nodes
            ],
            timeout=120,
        )
        problems = []
        for node, report in zip(nodes, reports):
            seen_back = (probe / f"node-{node}.txt").exists()
            if not (report["reads"] and report["writes"] and seen_back):
                problems.append(
                    f"node {report['host']} does not share the artifacts folder {folder} with this machine "
                    "(it cannot read what was written here, or what it writes is not seen here)"
                )
            problems += [f"node {report['host']} cannot see {p}" for p in report["missing"]]
        return problems
    finally:
        import shutil

        shutil.rmtree(probe, ignore_errors=True)
