"""Analyse page: run SOSP-H, SOSP-I or a baseline on the chosen model, with progress and cancel; the result is
stored."""

import uuid
from dataclasses import replace
from pathlib import Path

import streamlit as st

from app.text import plain

from app.background import CANCELLED, running_analysis, start_analysis, forget_analysis
from app.guard import user_errors
from app.pickers import analyses_frame, CURRENT_ANALYSIS
from app.state import current_choice, kept, workbench, workspace
from sosp_engine.saliency.analysis import AnalysisConfig, AnalysisOptions
from sosp_engine.saliency.methods import METHOD_LABELS, METHODS
from sosp_engine.devices import resolve_device
from sosp_engine.latency.runtimes import RUNTIMES
from sosp_engine.saliency.memory import default_budget

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
# while an analysis runs, its settings fold away, so its bar and Cancel at the top are in view at any window size
with (
    st.expander("Settings (folded while the analysis runs)" if busy else "Settings", expanded=not busy),
    st.form("analysis_form"),
):
    cols = st.columns(3)
    method = cols[0].selectbox(
        "Method", METHODS, format_func=METHOD_LABELS.get, key=kept("an-method", METHODS[0])
    )
    samples = cols[1].number_input(
        "Samples N'",
        1,
        100_000,
        key=kept("an-samples", 1000),
        help="drawn with the seed from the training split",
    )
    batch = cols[2].number_input("Batch size", 1, 4096, key=kept("an-batch", 100))
    fit_memory = cols[2].toggle(
        "Fit the batch to the free memory",
        key=kept("an-fit", True),
        help="measure what the method takes per sample on a few samples first, and lower the "
        "batch so the analysis stays within 80 % of the free GPU memory or 50 % of the "
        "free RAM",
    )
    cols = st.columns(3)
    cap = cols[0].slider(
        "Per-layer cap",
        0.05,
        1.0,
        step=0.05,
        key=kept("an-cap", 0.95),
        help="at most this fraction of a layer is pruned; one channel always stays",
    )
    min_channels = cols[0].number_input(
        "Minimum width kept per layer",
        1,
        4096,
        key=kept("an-min-channels", 1),
        help="at least this many structures (channels) of every layer stay, whatever the ratio",
    )
    normalize = cols[1].selectbox(
        "Normalisation",
        ["none", "kernel", "macs", "latency"],
        format_func={
            "none": "none",
            "kernel": "by kernel size (SOSP*)",
            "macs": "by MACs",
            "latency": "by measured latency",
        }.get,
        key=kept("an-normalize", "none"),
        help="rank structures by saliency per unit of cost; latency: each layer is timed "
        "alone on the analysis device first, so the order follows this machine",
    )
    loss = cols[2].selectbox("Loss", ["cross-entropy", "squared"], key=kept("an-loss", "cross-entropy"))
    # a form cannot hide what the normalisation does not use: its settings wait in a closed expander
    with st.expander("Timing for the normalisation by measured latency"):
        timing = st.columns(2)
        latency_batch = timing[0].number_input(
            "Latency batch",
            1,
            4096,
            key=kept("an-latency-batch", 1),
            help="the batch size the layers are timed at",
        )
        latency_runtime = timing[1].selectbox(
            "Latency runtime",
            RUNTIMES,
            key=kept("an-latency-runtime", RUNTIMES[0]),
            help="eager PyTorch, or the net exported to ONNX and timed in ONNX Runtime",
        )
    cols = st.columns(3)
    at_init = cols[0].toggle(
        "At initialisation",
        key=kept("an-at-init", False),
        help="analyse a fresh seeded init; BatchNorm statistics are re-estimated on the samples",
    )
    seed = cols[1].number_input("Seed", 0, 2**31 - 1, key=kept("an-seed", 0))
    device = cols[2].selectbox("Device", ["auto", "cpu", "cuda"], key=kept("an-device", "auto"))
    name = st.text_input("Name (optional)", placeholder="e.g. SOSP-H after training", key=kept("an-name", ""))
    run = st.form_submit_button("Run analysis", type="primary", icon=":material/play_arrow:")

if run:
    current = running_analysis(key)
    if current is not None and not current.finished:
        st.warning("An analysis is still running: wait for it or cancel it first.")
    else:
        with user_errors("Loading the model"):
            bench = workbench(choice)
        options = AnalysisOptions(
            method=method,
            at_init=at_init,
            samples=int(samples),
            seed=int(seed),
            batch_size=int(batch),
            cap=cap,
            min_channels=int(min_channels),
            normalize=normalize,
            latency_batch=int(latency_batch),
            latency_runtime=latency_runtime,
            loss=loss,
        )
        with user_errors("Starting the analysis"):
            if fit_memory:
                options.memory_budget_gb = default_budget(resolve_device(device)) / 2**30
            config = AnalysisConfig.of(replace(bench.setup, device=device), options)
            config.validate()
            start_analysis(key, bench, config, name, workspace())
        st.rerun()  # the settings fold away and the bar shows at the top


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


if (finished := running_analysis(key)) is not None and finished.cancel_said:
    forget_analysis(key)  # a cancellation reported on an earlier visit is not news any more
with progress_slot:
    analysis_progress()

st.subheader("Stored analyses")
records = workspace().analyses()
if records:
    st.dataframe(analyses_frame(records), hide_index=True)
else:
    st.info("None yet.")
