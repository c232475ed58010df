"""The sidebar every page shows: workspace, active model, data set and compute device; starts queued jobs."""

from collections import Counter
from pathlib import Path

import streamlit as st

from app.pickers import CURRENT_ANALYSIS
from app.text import plain

from app.guard import user_errors
from app.state import current_choice, workspace
from sosp_engine.devices import device_name, set_threads
from sosp_engine.runs.jobs import launch_pending
from sosp_engine.progress import counted


@st.cache_data
def _device_label() -> str:
    return device_name("auto")


def sidebar_threads() -> int:
    """Apply $SOSP_THREADS before any page computes; the sidebar shows the result."""
    with st.sidebar, user_errors("Setting the CPU threads ($SOSP_THREADS)"):
        return set_threads()


def render_sidebar(slot, threads: int) -> None:
    """Workspace, model, weights, data, device and job counts in `slot`, read after the page ran so they are current."""
    choice = current_choice()
    with slot:
        st.image(str(Path(__file__).resolve().parent.parent / "assets" / "logo.svg"), width=48)
        st.markdown("### SOSP Lab")
        st.caption("Second-order structured pruning and bottleneck analysis")
        with user_errors("Opening the workspace"):
            store = workspace()
            launch_pending(store)
        st.markdown(
            f"**Workspace** {plain(store.root)}  \n**Model** {plain(choice.model_spec)}  \n"
            f"**Weights** {plain(Path(choice.weights).name if choice.weights else 'random init')}  \n"
            f"**Data** {plain(choice.data_spec)}  \n"
            f"**Device** {plain(_device_label())}, {plain(counted(threads, 'CPU thread'))}"
        )
        current = current_analysis_name(store)
        if current:
            st.markdown(f"**Analysis** {plain(current)}", help="the analysis the pages open on")
        jobs_line()


def current_analysis_name(store) -> str | None:
    """The name of the analysis the pages share (chosen on any of them), or None before one was chosen."""
    chosen = st.session_state.get(CURRENT_ANALYSIS)
    return next((r["name"] for r in store.analyses() if r["id"] == chosen), None) if chosen else None


ACTIVE = ("starting", "running", "queued")


@st.fragment(run_every=3)
def jobs_line() -> None:
    """The active jobs by status, read from the store as the Runs page reads it and refreshed as often, so the two
    never disagree for long (a status is the store's word, never renamed here)."""
    with user_errors("Reading the jobs", stop=False):
        counts = Counter(j["status"] for j in workspace().jobs())
        active = [f"{counts[s]:d} {s}" for s in ACTIVE if counts[s] or s != "starting"]
        st.markdown(f"**Jobs** {plain(', '.join(active))}")
