"""Analyse page: run SOSP-H, SOSP-I or a baseline on the chosen model, with progress and cancel; the result is
stored."""

import uuid
from dataclasses import replace
from pathlib import Path

import streamlit as st

from app.text import plain

from app.background import CANCELLED, running_analysis, start_analysis, forget_analysis
from app.forms import form_values, more_options, option_input
from app.guard import user_errors
from app.pickers import analyses_frame, CURRENT_ANALYSIS
from app.state import current_choice, kept, workbench, workspace
from sosp_engine.saliency.analysis import AnalysisConfig, AnalysisOptions
from sosp_engine.saliency.methods import METHOD_LABELS

st.title("Analyse")
progress_slot = st.container()  # a running analysis's bar and Cancel stay at the top, above the form
choice = current_choice()
st.caption(
    plain(
        f"Model {choice.model_spec} on {choice.data_spec} with "
        f"{Path(choice.weights).name if choice.weights else 'random-init'} weights (change it on the Model page)."
    )
)

key = st.session_state.setdefault("analysis_key", uuid.uuid4().hex)  # this browser session's analysis thread
busy = (ongoing := running_analysis(key)) is not None and not ongoing.finished
NORMALISATION_LABELS = {
    "none": "none",
    "kernel": "by kernel size (SOSP*)",
    "macs": "by MACs",
    "latency": "by measured latency",
}
LAID_OUT = {
    "method",
    "samples",
    "batch_size",
    "memory_budget_gb",
    "cap",
    "min_channels",
    "normalize",
    "loss",
    "at_init",
    "seed",
}


def settings_form() -> tuple[bool, str, str]:
    """The analysis's settings, one widget per declared option (a new option lands under "More options");
    returns whether Run was pressed, the device and the name."""
    with st.form("analysis_form"):
        cols = st.columns(3)
        option_input(cols[0], AnalysisOptions, "method", "an", labels=METHOD_LABELS.get)
        option_input(cols[1], AnalysisOptions, "samples", "an")
        option_input(cols[2], AnalysisOptions, "batch_size", "an")
        cols = st.columns(3)
        option_input(cols[0], AnalysisOptions, "cap", "an")
        option_input(cols[0], AnalysisOptions, "min_channels", "an")
        option_input(cols[1], AnalysisOptions, "normalize", "an", labels=NORMALISATION_LABELS.get)
        option_input(cols[2], AnalysisOptions, "loss", "an")
        option_input(cols[2], AnalysisOptions, "memory_budget_gb", "an", default="auto")
        cols = st.columns(3)
        option_input(cols[0], AnalysisOptions, "at_init", "an")
        option_input(cols[1], AnalysisOptions, "seed", "an")
        device = cols[2].selectbox("Device", ["auto", "cpu", "cuda"], key=kept("an-device", "auto"))
        # a form cannot hide what the normalisation does not use: the rest waits in a closed expander
        more_options(
            st,
            AnalysisOptions,
            "Analyse page",
            LAID_OUT,
            "an",
            "More options: latency timing, SOSP-I's labels, width rounding",
        )
        name = st.text_input(
            "Name (optional)", placeholder="e.g. SOSP-H after training", key=kept("an-name", "")
        )
        return (
            st.form_submit_button("Run analysis", type="primary", icon=":material/play_arrow:"),
            device,
            name,
        )


# while an analysis runs, its settings fold away, so its bar and Cancel at the top are in view at any window size
with st.expander("Settings (folded while the analysis runs)" if busy else "Settings", expanded=not busy):
    run, device, name = settings_form()


def start(key: str, choice, device: str, name: str) -> None:
    """Start the analysis the form describes in this session's thread (one at a time)."""
    current = running_analysis(key)
    if current is not None and not current.finished:
        st.warning("An analysis is still running: wait for it or cancel it first.")
    else:
        with user_errors("Loading the model"):
            bench = workbench(choice)
        with user_errors("Starting the analysis"):
            options = AnalysisOptions(**form_values(AnalysisOptions, "an"))
            config = AnalysisConfig.of(replace(bench.setup, device=device), options)
            config.validate()
            start_analysis(key, bench, config, name, workspace())
        st.rerun()  # the settings fold away and the bar shows at the top


if run:
    start(key, choice, device, name)


@st.fragment(run_every=1)
def analysis_progress() -> None:
    """The running analysis's progress and Cancel, then its outcome; it survives visits to other pages."""
    current = running_analysis(key)
    if current is None:
        return
    label = METHOD_LABELS[current.config.method]
    if not current.finished:
        st.progress(current.fraction, text=plain(f"{label}: {current.message}"))
        if st.button("Cancel", icon=":material/stop:", key="cancel-analysis"):
            current.cancel = True
        st.caption("It keeps running if you open another page; its result is stored when it finishes.")
        return
    if not current.shown:  # once: rerun the whole page so everything on it (the table below) sees the outcome
        current.shown = True
        st.rerun()
    if current.error == CANCELLED:
        current.cancel_said = True  # shown for this visit of the page; the next visit forgets it
        st.warning("The analysis was cancelled; nothing was stored.")
        return
    if current.error:
        st.error(plain(f"The analysis failed: {current.error}"))
        return
    record = workspace().analysis(current.record_id)
    st.session_state[CURRENT_ANALYSIS] = (
        current.record_id
    )  # the analysis just run becomes the pages' current one
    st.success(
        f"Stored as **{plain(record['name'])}** ({plain(current.record_id)}). Timings: "
        + plain(", ".join(f"{k} {v:.2f} s" for k, v in record["summary"]["timings"].items()))
        + f". At most {record['summary']['max_ratio']:.0%} of the structures can be pruned with the cap."
        + (f" Estimated {plain(record['summary']['memory'])}." if record["summary"].get("memory") else "")
        + (
            f" Ranked by measured latency: {plain(record['summary']['layer_latency'])}."
            if record["summary"].get("layer_latency")
            else ""
        )
        + (
            f" {plain(record['summary']['curvature_form'])}."
            if record["summary"].get("curvature_form")
            else ""
        )
    )
    st.info("Open **Pruning ratios** in the sidebar to study its layer-wise profile.")


def stored_analyses() -> None:
    """The workspace's analyses, newest first."""
    st.subheader("Stored analyses")
    records = workspace().analyses()
    if records:
        st.dataframe(analyses_frame(records), hide_index=True)
    else:
        st.info("None yet.")


if (finished := running_analysis(key)) is not None and finished.cancel_said:
    forget_analysis(key)  # a cancellation reported on an earlier visit is not news any more
with progress_slot:
    analysis_progress()

stored_analyses()
