"""What a job does wherever it runs (this machine or a Ray worker): its study or procedure, its log lines, its cancel
flag, and listing its outputs in the workspace. Both the job runner and the backends use it; it imports neither."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import SospError
from ..nets.setup import stored_setup
from ..nets.setup import config_from_dict
from ..experiments.expand_study import EXPAND_STUDY_KIND, PLAIN, ExpandStudy, ExpandStudyConfig
from ..experiments.procedures import Experiment, ExperimentConfig, Reporter
from ..experiments.studies import STUDY_KIND, Study, StudyConfig
from ..saliency.analysis import AnalysisResult
from .records import store_analysis
from .store import Store, run_folder

LOG_EVERY_SECONDS = 10.0  # progress lines in a job's log between epoch lines
FAILED_PREFIX = "failed: "  # a job process's last words when the store cannot take them
LOG_TAIL_BYTES = 1 << 20
LOG_NAME = "job.log"
STUDY_KINDS = (STUDY_KIND, EXPAND_STUDY_KIND)  # jobs that run a grid of units, not one procedure


def read_log(store: Store, job_id: str, tail: int = 200) -> str:
    """The last `tail` lines of a job's log (read from its last MiB only, however long the log grew)."""
    path = Path(store.job(job_id)["path"]) / LOG_NAME
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
        text = fh.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-tail:])


def failure_in_log(store: Store, job_id: str) -> str | None:
    """The error a job's process wrote to its log when it could not record it in the store (a full disk), or None."""
    lines = [
        line for line in read_log(store, job_id, tail=400).splitlines() if line.startswith(FAILED_PREFIX)
    ]
    return lines[-1].removeprefix(FAILED_PREFIX) if lines else None


class LogLines:
    """A job's log: a line per epoch and otherwise one every LOG_EVERY_SECONDS (not every batch)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write, self.last = write, 0.0

    def __call__(self, fraction: float, message: str, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last > LOG_EVERY_SECONDS or fraction >= 1.0:
            self.write(f"[{time.strftime('%H:%M:%S')}] {fraction:6.1%} {message}")
            self.last = now


def throttled(ask: Callable[[], bool], seconds: float = 0.25) -> Callable[[], bool]:
    """`ask` (a cancel flag in the store or on the cluster) read at most every `seconds`: called once per batch."""
    state = {"checked": 0.0, "value": False}

    def should_stop() -> bool:
        now = time.time()
        if now - state["checked"] > seconds:
            state["checked"] = now
            state["value"] = ask()
        return state["value"]

    return should_stop


def execute(job: dict, report: Reporter, should_stop: Callable[[], bool], fan_out=None) -> dict:
    """The work of a job wherever it runs: its study or procedure in its run folder; returns the run's summary."""
    if job["kind"] == STUDY_KIND:
        return Study(
            config_from_dict(StudyConfig, job["config"]),
            run_folder(job),
            report,
            should_stop,
            fan_out=fan_out,
        ).run()
    if job["kind"] == EXPAND_STUDY_KIND:
        return ExpandStudy(
            config_from_dict(ExpandStudyConfig, job["config"]),
            run_folder(job),
            report,
            should_stop,
            fan_out=fan_out,
        ).run()
    return Experiment(
        config_from_dict(ExperimentConfig, job["config"]), run_folder(job), report, should_stop
    ).run()


def record_outputs(store: Store, job: dict, result: dict) -> None:
    """List a finished job's analysis (for the analysis pages) and its trained model in the workspace."""
    if job["kind"] == STUDY_KIND:
        return
    if job["kind"] == EXPAND_STUDY_KIND:  # the trained plain net's analysis, whose bottlenecks were widened
        analysis_folder, name = (
            run_folder(job) / PLAIN / "trial0" / "analysis",
            f"{job['name']} (plain net, trial 0)",
        )
    else:
        analysis_folder, name = run_folder(job) / "analysis", f"{job['name']} (analysis)"
    if (analysis_folder / "analysis.json").exists():
        try:
            store_analysis(store, AnalysisResult.load(analysis_folder), name)
        except (SospError, OSError) as exc:  # the run itself succeeded; only its listing is missing
            print(f"warning: the job's analysis could not be listed in the workspace: {exc}", flush=True)
    if job["kind"] == EXPAND_STUDY_KIND:
        return
    weights = result.get("stages", {}).get("train", {}).get("weights")
    if weights and job["config"]["procedure"] == "train":
        setup = stored_setup(job["config"])
        store.add_model(
            job["name"],
            setup.model_spec,
            setup.data_spec,
            Path(weights),
            job["id"],
            {"test_acc": result["test_acc"]},
        )
