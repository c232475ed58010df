"""Studies page: launch a methods x targets x seeds grid as one background job, follow it and the expand studies
launched from the Expand page, read the aggregates."""

from pathlib import Path

import pandas as pd
import streamlit as st

from app.charts import study_accuracy
from app.expand_study_view import expand_study_view
from app.export import export_buttons, file_slug
from sosp_engine.shown import safe_csv
from app.forms import form_values, more_options, option_input
from app.guard import user_errors
from app.placement import current_placement, placement_caption
from app.report import analysis_report
from app.state import code_confirmed, current_choice, is_pruned_checkpoint, kept, workspace
from app.text import plain, text_only
from app.tables import table as show_table
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.saliency.methods import METHODS
from sosp_engine.saliency.analysis import AnalysisOptions
from sosp_engine.experiments.training import TrainConfig
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.experiments.expand_study import EXPAND_STUDY_KIND
from sosp_engine.runs.jobs import submit_study
from sosp_engine.runs.work import STUDY_KINDS
from sosp_engine.experiments.studies import StudyConfig, aggregate
from sosp_engine.runs.study_state import study_cells
from sosp_engine.cli.args import parse_numbers
from sosp_engine.shown import terminal_text


SETUP_LAID_OUT = {"model_spec", "data_spec", "weights"}
SETUP_MORE = {"exclude", "preset", "device"}  # under "More model options"


def launch_section() -> None:
    """The method study's settings (every declared training and analysis option offered) and Launch."""
    choice = current_choice()
    with st.expander(
        "Launch a method study", expanded=not any(j["kind"] in STUDY_KINDS for j in workspace().jobs())
    ):
        cols = st.columns(3)
        model_spec = cols[0].text_input("Model", choice.model_spec, key="study-model")
        data_spec = cols[1].text_input("Data", choice.data_spec, key="study-data")
        pruned = is_pruned_checkpoint(
            choice.weights
        )  # a study of an already-pruned net is asked for, never inherited
        weights = cols[2].text_input(
            "Trained weights (empty: train one net per seed)",
            "" if pruned else choice.weights or "",
            key="study-weights",
        )
        if pruned:
            cols[2].caption(
                plain(
                    f"The Model page's weights ({Path(choice.weights).name}) are a pruned checkpoint; enter their path "
                    "here to study the pruned net on purpose."
                )
            )
        methods = st.multiselect(
            "Methods", list(METHODS), key=kept("study-methods", ["sosp-h", "sosp-i", "magnitude", "random"])
        )
        cols = st.columns(3)
        targets_text = cols[0].text_input("Targets (ratios)", key=kept("study-targets", "0.3,0.5,0.7"))
        unit = cols[1].radio(
            "Unit",
            ["params", "macs", "structures", "latency"],
            horizontal=True,
            key=kept("study-unit", "params"),
            help="latency: the CPU latency at batch 1, timed along each analysis's order",
        )
        option_input(cols[1], AnalysisOptions, "latency_runtime", "study-analysis")
        seeds_text = cols[2].text_input("Seeds", key=kept("study-seeds", "0,1,2"))
        cols = st.columns(4)
        option_input(cols[0], TrainConfig, "epochs", "study-training", default=10)
        finetune = cols[1].number_input("Fine-tuning epochs", 0, 1000, key=kept("study-finetune", 5))
        option_input(cols[2], AnalysisOptions, "samples", "study-analysis", default=500)
        name = cols[3].text_input("Name", key=kept("study-name", ""))
        cols = st.columns(3)
        more_options(cols[0], ModelSetup, "Studies page", SETUP_LAID_OUT, "study-setup", "More model options")
        more_options(
            cols[1], TrainConfig, "Studies page", {"epochs"}, "study-training", "More training options"
        )
        laid_out = {"samples", "latency_runtime"}
        more_options(
            cols[2], AnalysisOptions, "Studies page", laid_out, "study-analysis", "More analysis options"
        )
        confirmed = code_confirmed(model_spec.strip(), "The study's model spec")
        if st.button(
            "Launch study", icon=":material/play_arrow:", key="study-launch", disabled=not confirmed
        ):
            with user_errors("Launching the study", stop=False):
                config = StudyConfig(
                    setup=ModelSetup(
                        model_spec.strip(),
                        data_spec,
                        weights.strip() or None,
                        **form_values(ModelSetup, "study-setup", SETUP_MORE),
                    ),
                    methods=methods,
                    targets=parse_numbers(float, targets_text, "Targets"),
                    unit=unit,
                    seeds=parse_numbers(int, seeds_text, "Seeds"),
                    training=TrainConfig(**form_values(TrainConfig, "study-training")),
                    finetune_epochs=int(finetune),
                    analysis=AnalysisOptions(**form_values(AnalysisOptions, "study-analysis")),
                )
                job_id = submit_study(workspace(), config, name.strip(), placement=current_placement())
                st.success(
                    f"Study queued ({len(config.cells)} cells) on {plain(placement_caption())}; it runs in the "
                    "background and survives closing the tab."
                )
                st.session_state["study-chosen"] = job_id


def chosen_study(studies: list[dict]) -> tuple[str, str]:
    """The study picked (the one just launched first), and its kind."""
    kinds = {j["id"]: j["kind"] for j in studies}
    names = {
        j[
            "id"
        ]: f"{'expand study' if j['kind'] == EXPAND_STUDY_KIND else 'method study'}: {j['name']}  ·  {j['id']}"
        for j in reversed(studies)
    }
    ids = list(names)
    chosen = st.session_state.get("study-chosen")
    job_id = st.selectbox(
        "Study",
        ids,
        index=ids.index(chosen) if chosen in ids else 0,
        format_func=lambda i: terminal_text(names.get(i)),
    )

    return job_id, kinds[job_id]


@st.fragment(run_every=3)
def study_view(job_id: str) -> None:
    job = workspace().job(job_id)
    config = config_from_dict(StudyConfig, job["config"])
    with user_errors("Reading the study"):
        cells = study_cells(job)
    st.progress(
        min(job["progress"] or 0.0, 1.0),
        text=plain(f"{job['status']}: {len(cells)} of {len(config.cells)} cells — {job['message'] or ''}"),
    )
    if job["status"] == "failed":
        st.error(
            plain(f"The study failed: {job['error']}. Resume it on the Runs page; finished cells are kept.")
        )
    table = aggregate(cells)
    if table.empty:
        return
    figures = []
    for accuracy in ("acc_finetuned", "acc_pruned"):
        for size in ("params", "macs"):
            fig = study_accuracy(table, size, accuracy, config.unit)
            st.plotly_chart(text_only(fig), key=f"study-{accuracy}-{size}-{len(cells)}")
            export_buttons(fig, table, f"study {job['name']} {accuracy} vs {size}")
            figures.append(fig)
    st.subheader("Mean and std over seeds")
    show_table(table)
    with st.expander(f"All {len(cells)} cells, and where each ran"):
        frame = pd.DataFrame(cells)
        shown = [
            c
            for c in ("seed", "method", "target", "acc_pruned", "acc_finetuned", "params", "macs", "node")
            if c in frame
        ]
        show_table(frame[shown])
    st.download_button(
        "All cells (CSV)",
        safe_csv(pd.DataFrame(cells)),
        file_slug(f"study {job['name']} cells") + ".csv",
        "text/csv",
        key=f"cells-{len(cells)}",
    )
    report = analysis_report(
        f"SOSP Lab study: {job['name']}",
        {**job["config"], "cells done": len(cells)},
        figures,
        {"Mean and std over seeds": table},
    )
    st.download_button(
        "Study report (HTML)",
        report,
        file_slug(f"study {job['name']}") + ".html",
        "text/html",
        icon=":material/description:",
        key=f"report-{len(cells)}",
    )


st.title("Studies")
st.caption(
    "Which method wins on this net, at which size? Each seed trains the net once (or uses the given weights), "
    "analyses it once per method and slices that order at every target; each cell is pruned, tested, "
    "fine-tuned and tested again. Compare at equal parameters or MACs. Expand studies (expand- vs widen- vs "
    "train-pruning), launched on the Expand-pruning page, are listed here too."
)

launch_section()
studies = [j for j in workspace().jobs() if j["kind"] in STUDY_KINDS]
if not studies:
    st.info(
        "No study in this workspace yet. Expand studies (expand- vs widen- vs train-pruning) are launched on the "
        "Expand page."
    )
    st.stop()
job_id, kind = chosen_study(studies)
if kind == EXPAND_STUDY_KIND:
    st.fragment(run_every=3)(expand_study_view)(job_id)
else:
    study_view(job_id)
