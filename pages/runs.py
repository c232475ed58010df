"""Runs page: every analysis and job in the workspace, with status, progress, logs, metrics, cancel, resume,
delete, compare."""

import pandas as pd
import streamlit as st

from app.text import plain, text_only

from app.charts import accuracy_vs_size, training_curves
from app.confirm import confirmation, confirmation_used
from app.export import export_buttons
from app.guard import user_errors
from app.pickers import analyses_frame
from app.placement import placement_settings
from app.state import code_confirmed, workspace
from app.tables import table as show_table
from sosp_engine.experiments.procedures import compare_runs
from sosp_engine.nets.setup import stored_setup
from sosp_engine.runs.consent import has_consent
from sosp_engine.runs.jobs import cancel, mark_stale_jobs, resume
from sosp_engine.runs.work import read_log
from sosp_engine.shown import terminal_text


def deleted_note(what: str, kept: list[str], orphans: list[dict]) -> str:
    """What a deletion did, said once after the page reloads: what was deleted, what was left in place and why."""
    lines = [f"Deleted {what} and its files."]
    lines += [f"Left in place: {line}" for line in kept]
    if orphans:
        names = ", ".join(f"'{r['name']}'" for r in orphans)
        lines.append(
            f"Its analyses {names} stay listed: their results still open, but the weights they were computed on "
            "were the job's and are gone (delete them below if you no longer need them)."
        )
    return "\n\n".join(lines)


st.title("Runs")
store = workspace()
if "runs-deleted" in st.session_state:
    st.success(plain(st.session_state.pop("runs-deleted")), icon=":material/delete:")
mark_stale_jobs(store)


def jobs_table(jobs: list[dict]) -> None:
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "name": j["name"],
                    "kind": j["kind"],
                    "status": j["status"],
                    "progress": j["progress"] or 0.0,
                    "message": j["message"] or "",
                    "runs on": "this machine"
                    if j["backend"] == "local"
                    else f"ray: {j['node'] or 'waiting'}",
                    "test acc": (j["result"] or {}).get("test_acc"),
                    "params": (j["result"] or {}).get("params"),
                    "id": j["id"],
                }
                for j in jobs
            ]
        ),
        hide_index=True,
        column_config={
            "progress": st.column_config.ProgressColumn(
                "progress", format="percent", min_value=0, max_value=1
            ),
            "test acc": st.column_config.NumberColumn("test acc", format="percent"),
            "params": st.column_config.NumberColumn("params", format="localized"),
        },
    )


def job_controls(jobs: list[dict]) -> None:
    """The chosen job's controls, error, curves, log and config, from the same read of the store as the table."""
    job_id = st.selectbox(
        "Job",
        [j["id"] for j in jobs],
        format_func=lambda i: terminal_text(
            next(f"{j['name']} ({j['status']})" for j in jobs if j["id"] == i)
        ),
        key="job-choice",
    )
    job = next(j for j in jobs if j["id"] == job_id)
    cols = st.columns(4)
    if cols[0].button(
        "Cancel", disabled=job["status"] not in ("queued", "running", "starting"), icon=":material/stop:"
    ):
        with user_errors("Cancelling", stop=False):
            st.toast(plain(cancel(store, job_id)))
            st.rerun()
    resumable = job["status"] in ("failed", "cancelled")
    spec = stored_setup(job["config"]).model_spec
    unconfirmed = resumable and not has_consent(spec, job.get("consent"))
    if unconfirmed:
        resumable = code_confirmed(spec, f"Job '{job['name']}'")
    if cols[1].button("Resume", disabled=not resumable, icon=":material/replay:"):
        with user_errors("Resuming", stop=False):
            resume(store, job_id, run_code=unconfirmed)
            st.rerun()
    sure = confirmation("confirm delete", "delete-job", job_id, cols[2])
    if cols[3].button(
        "Delete job", disabled=not sure or job["status"] in ("running", "starting"), icon=":material/delete:"
    ):
        confirmation_used("delete-job", job_id)
        with user_errors("Deleting", stop=False):
            orphans = store.analyses_on_weights_of(job_id)
            kept = store.delete("job", job_id, confirm=True)
            st.session_state["runs-deleted"] = deleted_note(f"job '{job['name']}'", kept, orphans)
            st.rerun()
    if job["error"]:
        st.error(plain(job["error"]))
    metrics = pd.DataFrame([{"stage": m["stage"], **m["data"]} for m in store.metrics(job_id)])
    if not metrics.empty and "val_acc" in metrics:
        fig = training_curves(metrics, f"{job['name']}: validation accuracy")
        st.plotly_chart(text_only(fig), key="curves")
        export_buttons(fig, metrics, f"metrics {job['name']}")
    with st.expander("Log"):
        st.code(read_log(store, job_id) or "(empty)", language="text")
    with st.expander("Config and result"):
        st.json({"config": job["config"], "result": job["result"]})


@st.fragment(run_every=3)
def jobs_panel() -> None:
    """The jobs table and the chosen job, read from the store once per refresh, so both show the same status."""
    with user_errors("Reading the cluster's jobs", stop=False):
        mark_stale_jobs(store)  # also drains the events of jobs on a Ray cluster into the workspace
    damaged: list[str] = []
    jobs = store.jobs(damaged=damaged)
    for line in damaged:
        st.warning(
            plain(
                f"Job record {line}. It is not listed, run or resumed; nothing outside the workspace is touched."
            )
        )
    if not jobs:
        st.info(
            "No jobs yet. Start one from the Model or Expand-pruning page, or with `python -m sosp_engine jobs submit`."
        )
        return
    jobs_table(jobs)
    job_controls(jobs)


def analyses_section() -> None:
    """The workspace's analyses, each renamed or deleted (with a confirmation) on request."""
    st.subheader("Analyses")
    damaged_analyses: list[str] = []
    analyses = store.analyses(damaged=damaged_analyses)
    for line in damaged_analyses:
        st.warning(plain(f"Damaged analysis record {line}. It is not listed or opened; the others are."))
    if analyses:
        st.dataframe(analyses_frame(analyses), hide_index=True)
        with st.expander("Rename or delete an analysis"):
            target = st.selectbox(
                "Analysis",
                [r["id"] for r in analyses],
                format_func=lambda i: terminal_text(next(r["name"] for r in analyses if r["id"] == i)),
            )
            new_name = st.text_input("New name")
            if st.button("Rename") and new_name.strip():
                store.rename_analysis(target, new_name.strip())
                st.rerun()
            sure = confirmation("Yes, delete this analysis and its files for good", "delete-analysis", target)
            if st.button("Delete analysis", type="primary", disabled=not sure):
                confirmation_used("delete-analysis", target)
                with user_errors("Deleting", stop=False):
                    name = next(r["name"] for r in analyses if r["id"] == target)
                    kept = store.delete("analysis", target, confirm=True)
                    st.session_state["runs-deleted"] = deleted_note(f"analysis '{name}'", kept, [])
                    st.rerun()
    else:
        st.info("No analyses yet.")


def compare_finished_runs() -> None:
    """Finished runs side by side: accuracy against size."""
    jobs = store.jobs()
    if jobs:
        st.subheader("Compare runs")
        done = [
            j
            for j in jobs
            if j["status"] == "done" and j["result"] and j["result"].get("test_acc") is not None
        ]
        chosen = st.multiselect(
            "Finished runs",
            [j["id"] for j in done],
            format_func=lambda i: terminal_text(next(j["name"] for j in done if j["id"] == i)),
        )
        if chosen:
            table = compare_runs([{**j["result"], "config": j["config"]} for j in done if j["id"] in chosen])
            fig = accuracy_vs_size(table)
            st.plotly_chart(text_only(fig), key="runs-compare")
            export_buttons(fig, table, "runs-comparison")
            show_table(table)


analyses_section()
st.subheader("Jobs")
placement_settings()
jobs_panel()
compare_finished_runs()
