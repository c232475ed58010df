"""Analyse page: run SOSP-H, SOSP-I or a baseline on the chosen model, with progress and cancel; the result is stored."""
import streamlit as st

from app.text import plain

from app.guard import user_errors
from app.pickers import analyses_frame
from app.state import cached_workbench, current_choice, workspace
from sosp_engine.analysis import METHOD_LABELS, METHODS, AnalysisConfig, run_analysis
from sosp_engine.progress import Cancelled
from sosp_engine.records import store_analysis

st.title("Analyse")
choice = current_choice()
st.caption(f"Model `{choice.model_spec}` on `{choice.data_spec}` with {choice.weights or 'random-init'} weights (change it on the Model page).")

if st.session_state.pop("analysis_cancelled", False):
    st.warning("The analysis was cancelled; nothing was stored.")

with st.form("analysis_form"):
    cols = st.columns(3)
    method = cols[0].selectbox("Method", METHODS, format_func=METHOD_LABELS.get)
    samples = cols[1].number_input("Samples N'", 1, 100_000, 1000, help="drawn with the seed from the training split")
    batch = cols[2].number_input("Batch size", 1, 4096, 100)
    cols = st.columns(3)
    cap = cols[0].slider("Per-layer cap", 0.05, 1.0, 0.95, 0.05, help="at most this fraction of a layer is pruned; one channel always stays")
    normalize = cols[1].selectbox("Normalisation", ["none", "kernel", "macs"],
                                  format_func={"none": "none", "kernel": "by kernel size (SOSP*)", "macs": "by MACs"}.get)
    loss = cols[2].selectbox("Loss", ["cross-entropy", "squared"])
    cols = st.columns(3)
    at_init = cols[0].toggle("At initialisation", help="analyse a fresh seeded init; BatchNorm statistics are re-estimated on the samples")
    seed = cols[1].number_input("Seed", 0, 2**31 - 1, 0)
    device = cols[2].selectbox("Device", ["auto", "cpu", "cuda"])
    name = st.text_input("Name (optional)", placeholder="e.g. SOSP-H after training")
    run = st.form_submit_button("Run analysis", type="primary", icon=":material/play_arrow:")

if run:
    with user_errors("Loading the model"):
        workbench = cached_workbench(choice.model_spec, choice.data_spec, choice.weights)
    config = AnalysisConfig(method=method, model_spec=choice.model_spec, data_spec=choice.data_spec, weights=choice.weights,
                            at_init=at_init, samples=int(samples), seed=int(seed), batch_size=int(batch), cap=cap,
                            normalize=normalize, loss=loss, device=device)
    bar = st.progress(0.0, text="starting ...")
    cancel_slot = st.empty()  # clicking Cancel reruns the page, which stops this run at its next progress update
    cancel_slot.button("Cancel", icon=":material/stop:", on_click=lambda: st.session_state.update(analysis_cancelled=True))
    with user_errors("The analysis"):
        try:
            result = run_analysis(workbench, config, progress=lambda f, m: bar.progress(f, text=f"{METHOD_LABELS[method]}: {m}"))
        except Cancelled:
            st.warning("Cancelled.")
            st.stop()
        finally:
            cancel_slot.empty()
        record_id = store_analysis(workspace(), result, name)
    st.session_state["last_analysis"] = record_id
    st.session_state.pop("analysis_cancelled", None)
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
    st.success(f"Stored as **{plain(workspace().analysis(record_id)['name'])}** ({record_id}). Timings: {timing}. "
               f"At most {result.max_ratio:.0%} of the structures can be pruned with the cap.")
    st.info("Open **Pruning ratios** in the sidebar to study its layer-wise profile.")

st.subheader("Stored analyses")
records = workspace().analyses()
if records:
    st.dataframe(analyses_frame(records), hide_index=True)
else:
    st.info("None yet.")
