"""Analyses run in a server thread: navigating away from the page neither stops nor loses them; the result is stored
when it finishes and any page visit shows where it stands."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import streamlit as st

from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis
from sosp_engine.errors import one_line_error
from sosp_engine.pruning.workbench import Workbench
from sosp_engine.progress import Cancelled
from sosp_engine.runs.records import store_analysis
from sosp_engine.runs.store import Store


CANCELLED = "cancelled"


@dataclass
class RunningAnalysis:
    """What a page needs to show about one analysis thread."""

    config: AnalysisConfig
    name: str
    fraction: float = 0.0
    message: str = "starting ..."
    cancel: bool = False
    finished: bool = False
    record_id: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    shown: bool = False  # the page has rerun once since it finished (so the stored-analyses table lists it)
    cancel_said: bool = False  # the cancellation was reported once


@st.cache_resource
def _running() -> dict[str, RunningAnalysis]:
    """Every analysis thread of this server, by key (shared across reruns and pages)."""
    return {}


def start_analysis(
    key: str, workbench: Workbench, config: AnalysisConfig, name: str, store: Store
) -> RunningAnalysis:
    """Run `config` on `workbench` in a daemon thread; the result is stored under `name` when it ends."""
    run = RunningAnalysis(config, name)

    def work() -> None:
        try:
            result = run_analysis(
                workbench,
                config,
                progress=lambda f, m: setattr(run, "fraction", f) or setattr(run, "message", m),
                should_stop=lambda: run.cancel,
            )
            run.record_id = store_analysis(store, result, name)
        except Cancelled:
            run.error = CANCELLED
        except Exception as exc:  # shown on the page as an st.error, never a traceback
            run.error = one_line_error(exc)
        finally:
            run.finished = True

    _running()[key] = run
    threading.Thread(target=work, name=f"analysis-{key}", daemon=True).start()
    return run


def running_analysis(key: str) -> RunningAnalysis | None:
    return _running().get(key)


def forget_analysis(key: str) -> None:
    """Drop a finished analysis thread's outcome, once it has been shown."""
    _running().pop(key, None)
