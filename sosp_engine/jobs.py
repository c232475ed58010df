"""Background jobs: each runs as its own OS process (`python -m sosp_engine run-job ID`), so closing the UI never stops it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from .analysis import AnalysisResult
from .experiments import Experiment, ExperimentConfig, check_widening
from .errors import SospError
from .progress import Cancelled
from .records import store_analysis
from .store import Store, StoreError
from .studies import STUDY_KIND, Study, StudyConfig

HEARTBEAT_SECONDS = 2.0
STALE_AFTER_SECONDS = 20.0
EXIT_GRACE_SECONDS = 10.0
LOG_EVERY_SECONDS = 10.0  # progress lines in a job's log between epoch lines
LOG_NAME = "job.log"


def concurrency_limit() -> int:
    """One job per GPU, or one on a CPU-only machine."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def submit(store: Store, config: ExperimentConfig, name: str = "", start: bool = True) -> str:
    """Queue a job for `config` (FIFO) and start it if a slot is free."""
    config.validate()
    check_widening(config)
    job_id = store.add_job(config.procedure, name or config.label or config.procedure, asdict(config))
    if start:
        launch_pending(store)
    return job_id


def submit_study(store: Store, config: StudyConfig, name: str = "", start: bool = True) -> str:
    """Queue a study (one job running every cell of its grid) and start it if a slot is free."""
    config.validate()
    job_id = store.add_job(STUDY_KIND, name or f"study of {config.model_spec}", asdict(config))
    if start:
        launch_pending(store)
    return job_id


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
    """A running job whose process is gone or whose heartbeat stopped: it died and can be resumed."""
    if job["status"] not in ("running", "starting"):
        return False
    now = now or time.time()
    beat = job.get("heartbeat") or job.get("started") or job["created"]
    return not _pid_alive(job.get("pid")) or now - beat > STALE_AFTER_SECONDS


def mark_stale_jobs(store: Store) -> list[str]:
    """Turn dead running jobs into failed ones that say so (they stay resumable from their checkpoints)."""
    marked = []
    for job in store.jobs("running") + store.jobs("starting"):
        claimed = job.get("heartbeat") or job["created"]
        if job["status"] == "starting" and time.time() - claimed < STALE_AFTER_SECONDS and not job.get("pid"):
            continue  # being launched right now
        if is_stale(job):
            store.update_job(job["id"], status="failed", finished=time.time(),
                             error="the job's process died (no heartbeat); resume it to continue from its last checkpoint")
            marked.append(job["id"])
    return marked


def launch_pending(store: Store) -> list[str]:
    """Start queued jobs up to the concurrency limit, oldest first; returns the ids started."""
    mark_stale_jobs(store)
    started = []
    for job in store.claim_queued_jobs(concurrency_limit()):
        log = open(Path(job["path"]) / LOG_NAME, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen([sys.executable, "-m", "sosp_engine", "run-job", job["id"], "--workspace", str(store.root)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env, cwd=root)
        threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it ends: no zombie under the UI
        store.update_job(job["id"], pid=proc.pid, heartbeat=time.time())
        started.append(job["id"])
    return started


def cancel(store: Store, job_id: str) -> str:
    """Cancel a queued job now, or ask a running one to stop at its next batch (it keeps a resumable checkpoint)."""
    job = store.job(job_id)
    if job["status"] == "queued":
        store.update_job(job_id, status="cancelled", finished=time.time())
        return "cancelled"
    if job["status"] in ("running", "starting"):
        store.update_job(job_id, cancel_requested=1)
        return "cancel requested"
    raise StoreError(f"job '{job_id}' is {job['status']}; only queued or running jobs can be cancelled")


def resume(store: Store, job_id: str, start: bool = True) -> None:
    """Queue a failed or cancelled job again; it continues after its last finished stage and epoch."""
    mark_stale_jobs(store)
    job = store.job(job_id)
    if job["status"] not in ("failed", "cancelled"):
        raise StoreError(f"job '{job_id}' is {job['status']}; only failed or cancelled jobs can be resumed")
    if not _runner_exited(job.get("pid"), job_id, EXIT_GRACE_SECONDS):
        raise StoreError(f"job '{job_id}' still has a live process (pid {job['pid']}, stopped or slow): wait for it "
                         "to end or kill it, then resume")
    store.update_job(job_id, status="queued", error=None, cancel_requested=0, pid=None, finished=None)
    if start:
        launch_pending(store)


def read_log(store: Store, job_id: str, tail: int = 200) -> str:
    """The last `tail` lines of a job's log."""
    path = Path(store.job(job_id)["path"]) / LOG_NAME
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-tail:])


def run_job(store: Store, job_id: str) -> int:
    """The body of a job process: heartbeat, progress and metrics into the store, then done / failed / cancelled."""
    job = store.job(job_id)
    store.update_job(job_id, status="running", pid=os.getpid(), started=job.get("started") or time.time(),
                     heartbeat=time.time(), message="starting")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                store.update_job(job_id, heartbeat=time.time())
            except Exception:  # the store is busy; the next beat will do
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()

    def terminate(signum, frame) -> None:  # kill / shutdown: stop like a cancel, resumable from the last epoch
        raise Cancelled("stopped by SIGTERM; resume it to continue from its last epoch checkpoint")

    signal.signal(signal.SIGTERM, terminate)
    last_write, last_print = [0.0], [0.0]

    def report(fraction: float, message: str, metrics: dict | None) -> None:
        now = time.time()
        if metrics is not None:
            store.add_metrics(job_id, metrics.get("stage", ""), int(metrics.get("epoch", 0)), metrics)
        if metrics is not None or now - last_write[0] > 0.5 or fraction >= 1.0:
            store.update_job(job_id, progress=fraction, message=message, heartbeat=now)
            last_write[0] = now
        if metrics is not None or now - last_print[0] > LOG_EVERY_SECONDS or fraction >= 1.0:  # not every batch
            print(f"[{time.strftime('%H:%M:%S')}] {fraction:6.1%} {message}", flush=True)
            last_print[0] = now

    cancel_state = {"checked": 0.0, "value": False}

    def should_stop() -> bool:
        now = time.time()
        if now - cancel_state["checked"] > 0.25:
            cancel_state["checked"] = now
            cancel_state["value"] = bool(store.job(job_id)["cancel_requested"])
        return cancel_state["value"]

    try:
        if job["kind"] == STUDY_KIND:
            result = Study(StudyConfig(**job["config"]), Path(job["path"]) / "run", report, should_stop).run()
            config = None
        else:
            config = ExperimentConfig(**job["config"])
            result = Experiment(config, Path(job["path"]) / "run", report, should_stop).run()
        analysis_folder = Path(job["path"]) / "run" / "analysis"
        if config is not None and (analysis_folder / "analysis.json").exists():  # open it on the analysis pages
            try:
                store_analysis(store, AnalysisResult.load(analysis_folder), f"{job['name']} (analysis)")
            except (SospError, OSError) as exc:  # the run itself succeeded; only its listing is missing
                print(f"warning: the job's analysis could not be listed in the workspace: {exc}", flush=True)
        if config is not None and result.get("stages", {}).get("train", {}).get("weights") and config.procedure == "train":
            store.add_model(job["name"], config.model_spec, config.data_spec, Path(result["stages"]["train"]["weights"]),
                            job_id, {"test_acc": result["test_acc"]})
        store.update_job(job_id, status="done", finished=time.time(), progress=1.0, message="done", result=result)
        code = 0
    except Cancelled as exc:
        store.update_job(job_id, status="cancelled", finished=time.time(), message=str(exc))
        print(f"cancelled: {exc}", flush=True)
        code = 0
    except Exception as exc:  # the job failed: keep the error and the traceback in the store and the log
        print(traceback.format_exc(), flush=True)
        store.update_job(job_id, status="failed", finished=time.time(), error=f"{type(exc).__name__}: {exc}")
        code = 1
    finally:
        stop.set()
    launch_pending(store)
    return code
