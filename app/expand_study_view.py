"""An expand study's live view (Studies and Expand pages): progress, accuracy against params and MACs with error bars
and the unpruned plain net as the reference, the table over trials, every run and where it ran, exports."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.charts import accuracy_vs_size
from app.export import export_buttons, file_slug
from app.tables import table as show_table
from sosp_engine.shown import safe_csv
from app.guard import user_errors
from app.report import analysis_report
from app.state import workspace
from app.text import plain, text_only
from sosp_engine.runs.study_state import expand_state
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.experiments.expand_study import (
    ExpandStudyConfig,
    expand_table,
    unpruned_reference,
)

RUN_COLUMNS = ("procedure", "trial", "test_acc", "test_acc_after_pruning", "params", "macs", "node")


def expand_study_view(job_id: str) -> None:
    """Everything an expand study has finished so far; call it inside a fragment that reruns while it runs."""
    job = workspace().job(job_id)
    config = config_from_dict(ExpandStudyConfig, job["config"])
    with user_errors("Reading the expand study"):
        state = expand_state(job)
    runs, plan = state["runs"], state["plan"]
    st.progress(
        min(job["progress"] or 0.0, 1.0),
        text=plain(f"{job['status']}: {len(runs)} of {len(config.runs)} runs — {job['message'] or ''}"),
    )
    if job["status"] == "failed":
        st.error(
            plain(f"The study failed: {job['error']}. Resume it on the Runs page; finished runs are kept.")
        )
    if plan:
        widened = ", ".join(f"{unit} x{factor:g}" for unit, factor in plan["widen"].items())
        st.caption(
            plain(
                f"Expand-pruning widens {widened}; every run is pruned to {plan['target_params']:,} parameters, "
                f"the size of the train-pruned plain net ({plan['plain_params']:,} unpruned)."
            )
        )
    table = expand_table(runs)
    if table.empty:
        return
    reference = unpruned_reference(runs, plan)
    figures = []
    for size in ("params", "macs"):
        fig = accuracy_vs_size(table, size, (reference[size], reference["test_acc"]) if reference else None)
        st.plotly_chart(text_only(fig), key=f"expand-{job_id}-{size}-{len(runs)}")
        export_buttons(fig, table, f"expand study {job['name']} accuracy vs {size}")
        figures.append(fig)
    st.caption(
        "Matched in parameters; the MACs chart shows what each procedure costs at inference. The star is the "
        "unpruned plain net (its accuracy after the train-prune trials' training)."
    )
    show_table(table)  # readable columns; no spread claimed from a single trial
    frame = pd.DataFrame(runs)
    with st.expander(f"All {len(runs)} runs, and where each ran"):
        st.dataframe(frame[[c for c in RUN_COLUMNS if c in frame]], hide_index=True)
    st.download_button(
        "All runs (CSV)",
        safe_csv(frame),
        file_slug(f"expand study {job['name']} runs") + ".csv",
        "text/csv",
        key=f"runs-{job_id}-{len(runs)}",
    )
    report = analysis_report(
        f"SOSP Lab expand study: {job['name']}",
        {**job["config"], "runs done": len(runs)},
        figures,
        {"Mean and std over trials": table},
    )
    st.download_button(
        "Study report (HTML)",
        report,
        file_slug(f"expand study {job['name']}") + ".html",
        "text/html",
        icon=":material/description:",
        key=f"expand-report-{job_id}-{len(runs)}",
    )
