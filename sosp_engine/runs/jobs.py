"""Background jobs: the queue, their lifecycle (submit, launch, heartbeat, stale detection, cancel, resume) and the body
of a job's process; where a job runs is its backend's business (`backends.local`, `backends.ray`), and what it does
is `work`'s. The workspace's store is the one record of all of them."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SospError
from ..nets.setup import stored_setup
from ..experiments.expand_study import EXPAND_STUDY_KIND, PLAIN, ExpandStudyConfig
from ..experiments.procedures import ExperimentConfig, check_runnable
from ..experiments.studies import STUDY_KIND, StudyConfig
from ..pruning.workbench import open_workbench
from ..progress import Cancelled
from .backends import local
from .consent import consent_for, require_job_consent
from .store import Store, StoreError
from .work import FAILED_PREFIX, LogLines, execute, failure_in_log, record_outputs, throttled

HEARTBEAT_SECONDS = 2.0
STALE_AFTER_SECONDS = 20.0
EXIT_GRACE_SECONDS = 10.0
RAY_QUEUE_LIMIT = 1000  # the cluster queues jobs by their resources itself
BACKENDS = ("local", "ray")
RAY_ADDRESS_ENV = "SOSP_RAY_ADDRESS"


@dataclass
class Placement:
    """Where a job runs: this machine, or a Ray cluster at `address` with its run folder under `artifacts`."""

    backend: str = "local"
    address: str | None = (
        None  # ray: HOST:PORT, 'auto' for a cluster started on this machine; default $SOSP_RAY_ADDRESS
    )
    artifacts: str | None = None  # a folder every node reaches; default: the workspace's job folder
    gpus_per_worker: float = 1.0  # ray: GPUs each training process (worker) takes, where the job uses GPUs
    accelerator_type: str | None = (
        None  # ray: only nodes of this GPU type (Ray's accelerator_type, e.g. A100)
    )
    custom_resources: dict[str, float] = field(default_factory=dict)  # ray: custom resources of each worker

    def requests(self) -> dict:
        """What each worker of a cluster job asks for besides its CPUs / GPUs, as stored with the job."""
        return {
            "gpus_per_worker": self.gpus_per_worker,
            "accelerator_type": self.accelerator_type,
            "custom": dict(self.custom_resources),
        }

    def resolved(self) -> "Placement":
        """The placement with the address from the environment filled in, checked (a Ray cluster is reached now)."""
        if self.backend not in BACKENDS:
            raise SospError(f"unknown job backend '{self.backend}'; use one of {', '.join(BACKENDS)}")
        if self.backend == "local":
            return Placement("local", None, self.artifacts)
        if not self.gpus_per_worker > 0 or any(not amount > 0 for amount in self.custom_resources.values()):
            raise SospError("GPUs per worker and every custom resource amount must be above 0")
        from .backends.ray import cluster_summary

        address = self.address or os.environ.get(RAY_ADDRESS_ENV) or ""
        cluster_summary(address)
        return Placement(
            "ray", address, self.artifacts, self.gpus_per_worker, self.accelerator_type, self.custom_resources
        )


def concurrency_limit() -> int:
    """One job per GPU, or one on a CPU-only machine."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def submit(
    store: Store,
    config: ExperimentConfig,
    name: str = "",
    start: bool = True,
    placement: Placement | None = None,
) -> str:
    """Queue a job for `config` (FIFO) and start it if a slot is free; a job for a cluster is checked there."""
    config.validate()
    if (placement or Placement()).backend == "local":
        check_runnable(config)
    return _add(
        store, config.procedure, name or config.label or config.procedure, asdict(config), start, placement
    )


def submit_study(
    store: Store, config: StudyConfig, name: str = "", start: bool = True, placement: Placement | None = None
) -> str:
    """Queue a study (one job running every cell of its grid; on Ray the cells run in parallel) and start it."""
    config.validate()
    if (placement or Placement()).backend == "local":
        open_workbench(config.setup)
    return _add(
        store, STUDY_KIND, name or f"study of {config.setup.model_spec}", asdict(config), start, placement
    )


def submit_expand_study(
    store: Store,
    config: ExpandStudyConfig,
    name: str = "",
    start: bool = True,
    placement: Placement | None = None,
) -> str:
    """Queue an expand study (every procedure's trials as one job; on Ray the runs of a phase run in parallel)."""
    config.validate()
    if (placement or Placement()).backend == "local":
        check_runnable(
            config.experiment("expand-prune", 0, config.widen, None)
            if config.widen
            else config.experiment(PLAIN, 0, {}, None)
        )
    return _add(
        store,
        EXPAND_STUDY_KIND,
        name or f"expand study of {config.setup.model_spec}",
        asdict(config),
        start,
        placement,
    )


def _add(store: Store, kind: str, name: str, config: dict, start: bool, placement: Placement | None) -> str:
    """Queue a job; submitting a spec is the caller's consent to the code it names, stored signed with the job."""
    where = (placement or Placement()).resolved()
    if where.backend == "ray":
        from .backends.ray import check_storage

        folder = Path(where.artifacts).expanduser().resolve() if where.artifacts else store.artifacts
        check_storage(where.address, str(folder), local_paths(config))
    job_id = store.add_job(
        kind,
        name,
        config,
        where.backend,
        where.address,
        where.artifacts,
        consent_for(stored_setup(config).model_spec),
        where.requests() if where.backend == "ray" else {},
    )
    if start:
        launch_pending(store)
    return job_id


def custom_resources(text: str | list[str]) -> dict[str, float]:
    """{NAME: AMOUNT} from 'NAME=AMOUNT' items (a list, or one comma-separated string)."""
    items = text.split(",") if isinstance(text, str) else text
    found = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, _, amount = item.partition("=")
        try:
            found[name.strip()] = float(amount)
        except ValueError:
            raise SospError(f"a custom resource is NAME=AMOUNT (e.g. nvme=1), not '{item}'") from None
    return found


def local_paths(config: dict) -> list[str]:
    """The files and folders of this machine a job's specs name (its data, weights and model code), which a
    cluster's nodes must see at the same paths."""
    found = []
    setup = stored_setup(config)
    for value in (setup.model_spec, setup.data_spec, setup.weights):
        if not isinstance(value, str) or not value:
            continue
        scheme_dropped, code_file = value.partition(":")[2], value.rpartition(":")[0]
        for candidate in (value, scheme_dropped, code_file):
            if candidate and Path(candidate).expanduser().exists():
                found.append(str(Path(candidate).expanduser().resolve()))
                break
    return sorted(set(found))


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a finished child that nobody reaped is a zombie, not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _is_runner_of(pid: int, job_id: str) -> bool:
    """True when `pid` is a `run-job` process for this job (a recycled pid of another program is not)."""
    try:
        return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _runner_exited(pid: int | None, job_id: str, grace: float) -> bool:
    """Wait up to `grace` seconds for the job's runner to exit (it records its final status just before it does)."""
    deadline = time.time() + grace
    while _pid_alive(pid) and _is_runner_of(pid, job_id):
        if time.time() >= deadline:
            return False
        time.sleep(0.1)
    return True


def is_stale(job: dict, now: float | None = None) -> bool:
    """A running local job whose process is gone or whose heartbeat stopped: it died and can be resumed."""
    if job["status"] not in ("running", "starting") or job.get("backend", "local") != "local":
        return False
    now = now or time.time()
    beat = job.get("heartbeat") or job.get("started") or job["created"]
    return (
        not _pid_alive(job.get("pid")) or abs(now - beat) > STALE_AFTER_SECONDS
    )  # a beat from the future lies


def mark_stale_jobs(store: Store) -> list[str]:
    """Turn dead running jobs into failed ones that say so (they stay resumable from their checkpoints); remote jobs'
    events are drained into the store first."""
    marked: list[str] = []
    if store.read_only:  # nothing can be marked there; its jobs are listed as they were stored
        return marked
    active = store.jobs("running") + store.jobs("starting")
    if any(job["backend"] == "ray" for job in active):
        from .backends.ray import sync

        try:
            marked += sync(store)
        except SospError as exc:  # the cluster is out of reach now: say so on its jobs, they keep their state
            for job in active:
                if job["backend"] == "ray":
                    store.update_job(job["id"], message=f"no news from the cluster: {exc}")
    for job in active:
        if job["backend"] != "local":
            continue
        claimed = job.get("heartbeat") or job["created"]
        if (
            job["status"] == "starting"
            and 0 <= time.time() - claimed < STALE_AFTER_SECONDS
            and not job.get("pid")
        ):
            continue  # being launched right now (a claim time in the future is a stepped clock or an edited row)
        if is_stale(job):
            cause = failure_in_log(store, job["id"])
            store.update_job(
                job["id"],
                status="failed",
                finished=time.time(),
                error=f"{cause} (the store could not take this error when it happened; resume the job once the "
                "cause is fixed)"
                if cause
                else "the job's process died (no heartbeat); resume it to continue from its last checkpoint",
            )
            marked.append(job["id"])
    return marked


def launch_pending(store: Store) -> list[str]:
    """Start queued jobs up to the concurrency limit, oldest first; returns the ids started."""
    if store.read_only:
        return []
    mark_stale_jobs(store)
    started = []
    remote = _consented(store, store.claim_queued_jobs(RAY_QUEUE_LIMIT, "ray"))
    if remote:
        from .backends.ray import start_job

        for job in remote:
            try:
                start_job(store, job)
                started.append(job["id"])
            except SospError as exc:
                store.update_job(job["id"], status="failed", finished=time.time(), error=str(exc))
    for job in _consented(store, store.claim_queued_jobs(concurrency_limit())):
        local.start_job(store, job)
        started.append(job["id"])
    return started


def _consented(store: Store, jobs: list[dict]) -> list[dict]:
    """The claimed jobs whose model spec, as stored now, runs no code the user did not confirm; the others fail
    with the reason (nothing of theirs is imported)."""
    runnable = []
    for job in jobs:
        try:
            require_job_consent(job)
            runnable.append(job)
        except SospError as exc:
            store.update_job(job["id"], status="failed", finished=time.time(), error=str(exc))
    return runnable


def cancel(store: Store, job_id: str) -> str:
    """Cancel a queued job now, or ask a running one to stop at its next batch (it keeps a resumable checkpoint)."""
    job = store.job(job_id)
    if job["status"] == "queued":
        store.update_job(job_id, status="cancelled", finished=time.time())
        return "cancelled"
    if job["status"] in ("running", "starting"):
        store.update_job(job_id, cancel_requested=1)
        if job["backend"] == "ray":
            mark_stale_jobs(store)  # passes the request on to the cluster now
        return "cancel requested"
    raise StoreError(f"job '{job_id}' is {job['status']}; only queued or running jobs can be cancelled")


def resume(store: Store, job_id: str, start: bool = True, run_code: bool = False) -> None:
    """Queue a failed or cancelled job again; it continues after its last finished stage and epoch. A job naming user
    code needs the consent stored with it, or `run_code` (the user confirms the spec as stored now)."""
    mark_stale_jobs(store)
    job = store.job(job_id)
    if job["status"] not in ("failed", "cancelled"):
        raise StoreError(f"job '{job_id}' is {job['status']}; only failed or cancelled jobs can be resumed")
    spec = stored_setup(job["config"]).model_spec
    if run_code:
        store.update_job(job_id, consent=consent_for(spec))
    else:
        require_job_consent(job)
    if job["backend"] == "ray":
        from .backends.ray import release

        release(job)
    elif not _runner_exited(job.get("pid"), job_id, EXIT_GRACE_SECONDS):
        raise StoreError(
            f"job '{job_id}' still has a live process (pid {job['pid']}, stopped or slow): wait for it "
            "to end or kill it, then resume"
        )
    store.update_job(job_id, status="queued", error=None, cancel_requested=0, pid=None, finished=None)
    if start:
        launch_pending(store)


def _record_failure(store: Store, job_id: str, error: str, tries: int = 5) -> int:
    """Store a failed job's error, retrying while the store cannot be written (a disk that was full a moment ago);
    if it never can, the error is the log's last line, which the reaper stores with the exit code."""
    for attempt in range(tries):
        try:
            store.update_job(job_id, status="failed", finished=time.time(), error=error)
            return 1
        except SospError:
            time.sleep(0.5 * (attempt + 1))
    print(f"{FAILED_PREFIX}{error}", flush=True)
    return 1


def run_job(store: Store, job_id: str) -> int:
    """The body of a job process: heartbeat, progress and metrics into the store, then done / failed / cancelled."""
    job = store.job(job_id)
    try:
        require_job_consent(job)  # checked again here: what is stored now may differ from what was launched
    except SospError as exc:
        return _record_failure(store, job_id, str(exc))
    store.update_job(
        job_id,
        status="running",
        pid=os.getpid(),
        started=job.get("started") or time.time(),
        heartbeat=time.time(),
        message="starting",
    )
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                store.update_job(job_id, heartbeat=time.time())
            except Exception:  # the store is busy; the next beat will do
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()

    def terminate(
        signum, frame
    ) -> None:  # kill / shutdown: stop like a cancel, resumable from the last epoch
        raise Cancelled("stopped by SIGTERM; resume it to continue from its last epoch checkpoint")

    signal.signal(signal.SIGTERM, terminate)
    last_write = [0.0]
    log = LogLines(lambda line: print(line, flush=True))

    def report(fraction: float, message: str, metrics: dict | None) -> None:
        now = time.time()
        if metrics is not None:
            store.add_metrics(job_id, metrics.get("stage", ""), int(metrics.get("epoch", 0)), metrics)
        if metrics is not None or now - last_write[0] > 0.5 or fraction >= 1.0:
            store.update_job(job_id, progress=fraction, message=message, heartbeat=now)
            last_write[0] = now
        log(fraction, message, metrics is not None)

    should_stop = throttled(lambda: bool(store.job(job_id)["cancel_requested"]))

    try:
        result = execute(job, report, should_stop)
        record_outputs(store, job, result)
        store.update_job(
            job_id,
            status="done",
            finished=time.time(),
            progress=1.0,
            message="done",
            result=result,
            error=None,
        )  # a stale mark made while this runner was stopped is no longer true
        code = 0
    except Cancelled as exc:
        store.update_job(job_id, status="cancelled", finished=time.time(), message=str(exc))
        print(f"cancelled: {exc}", flush=True)
        code = 0
    except Exception as exc:  # the job failed: keep the error and the traceback in the store and the log
        print(traceback.format_exc(), flush=True)
        code = _record_failure(store, job_id, f"{type(exc).__name__}: {exc}")
    finally:
        stop.set()
    launch_pending(store)
    return code
