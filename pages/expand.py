"""Expand-pruning page: widen the bottlenecks, match a widen-pruning baseline, launch the runs, watch them, compare."""

import streamlit as st

from app.forms import form_values, more_options, option_input

from app.expand_study_view import expand_study_view
from app.guard import user_errors
from app.text import plain
from app.placement import current_placement, placement_caption
from app.pickers import chosen_analysis
from app.state import workspace
from sosp_engine.experiments.bottlenecks import paper_level, widening_plan
from sosp_engine.experiments.expand_study import EXPAND_PROCEDURES, EXPAND_STUDY_KIND, ExpandStudyConfig
from sosp_engine.runs.jobs import submit_expand_study
from sosp_engine.pruning.masks import layer_table, mask_summary
from sosp_engine.pruning.workbench import expansion_sizes
from sosp_engine.experiments.training import TrainConfig
from sosp_engine.progress import counted
from sosp_engine.shown import terminal_text


def bottleneck_source(record: dict, result) -> tuple[str, set[str] | None, str]:
    """The level, the units picked on the Bottlenecks page for this analysis (None: the paper's choice), in words."""
    chosen = st.session_state.get("bottleneck_choice")
    if chosen and chosen["analysis"] == record["id"]:
        picked = set(chosen["units"])
        return (
            chosen["level"],
            picked,
            f"the {counted(len(picked), chosen['level'])} flagged on the Bottlenecks page",
        )
    level = paper_level(result.config.setup.model_spec)[0]
    least = "least pruned stage" if level == "stage" else "five least pruned layers"
    return level, None, f"the {least} (no choice made on the Bottlenecks page)"


def edited_factors(record: dict, result, table) -> dict[str, float]:
    """The widening plan, pre-filled from the bottlenecks and editable; the factors that widen."""
    level, picked, source = bottleneck_source(record, result)
    with user_errors("Finding bottlenecks"):
        defaults = widening_plan(result.config.setup.model_spec, table, level, picked)
    st.markdown(f"Pre-filled: {plain(source)}, x2 (edit any factor).")
    edited = st.data_editor(
        defaults,
        hide_index=True,
        disabled=["unit", "pruning_ratio"],
        key=f"factors-{record['id']}-{level}-{sorted(picked) if picked is not None else 'auto'}",
        column_config={
            "factor": st.column_config.NumberColumn("width factor", min_value=0.25, max_value=8.0, step=0.25),
            "pruning_ratio": st.column_config.NumberColumn("pruning ratio", format="percent"),
        },
    )
    return {u: float(f) for u, f in zip(edited.unit, edited.factor) if abs(f - 1.0) > 1e-9}


@st.cache_data(show_spinner="Sizing the widened networks ...")
def sizes(_workbench, record_id: str, factors_items: tuple) -> tuple[int, int, float, int]:
    """The expansion's sizes for the analysis `record_id` (whose workbench is `_workbench`) and the factors."""
    return expansion_sizes(_workbench, dict(factors_items))


def size_metrics(record: dict, workbench, factors: dict[str, float], target: int) -> None:
    """The plain, expanded and widened nets' sizes and the pruning target every run meets."""
    with user_errors("Widening"):
        base_params, expanded_params, factor, matched = sizes(
            workbench, record["id"], tuple(sorted(factors.items()))
        )
    cols = st.columns(5)
    cols[0].metric("Plain net (params)", f"{base_params:,}")
    cols[1].metric(
        "Expanded net (params)", f"{expanded_params:,}", f"+{expanded_params / base_params - 1:.0%}"
    )
    cols[2].metric(
        "Widen-pruning factor", f"x{factor:.3f}", help="one factor for every layer giving the expanded size"
    )
    cols[3].metric(
        "Widened net (params)",
        f"{matched:,}",
        f"{matched - expanded_params:+,} vs expanded",
        delta_color="off",
    )
    cols[4].metric(
        "Pruning target (params)",
        f"{target:,}",
        help="every run is pruned to the size of the train-pruned plain net",
    )


def launch_form(record: dict, result, factors: dict[str, float], pruned_size: dict) -> None:
    """The expand study's runs, trials and training, launched as one background job."""
    target = pruned_size["params_after"]
    trained = bool(result.config.setup.weights) and not result.config.at_init
    with st.form("launch"):
        procedures = st.multiselect(
            "Runs",
            list(EXPAND_PROCEDURES),
            ["expand-prune", "widen-prune", "train-prune"],
            help="train-prune is always needed: its trained plain net sets the size. init-prune "
            "prunes at initialisation and trains for the same total epochs.",
            key=f"expand-runs-{record['id']}",
        )
        c = st.columns(3)
        trials = c[0].number_input(
            "Trials",
            1,
            10,
            3,
            help="the paper runs 3 trials; the charts show mean and std",
            key="expand-trials",
        )
        option_input(c[1], TrainConfig, "epochs", "expand-training", default=10)
        finetune = c[2].number_input("Epochs (fine-tune)", 1, 1000, 10, key="expand-finetune")
        own = st.toggle(
            "Find the bottlenecks on the study's own trained plain net (as the paper does)",
            value=not trained,
            help="off: widen the factors above, from this analysis"
            + (
                ""
                if trained
                else "; this analysis is not of trained weights, so its bottlenecks are those of an untrained net"
            ),
            key=f"expand-own-{record['id']}",
        )
        more_options(st, TrainConfig, "Expand page", {"epochs"}, "expand-training", "More training options")
        launch = st.form_submit_button(
            "Launch the expand study", type="primary", icon=":material/rocket_launch:"
        )
    if launch:
        with user_errors("Launching"):
            config = ExpandStudyConfig(
                setup=result.config.setup.with_weights(None),
                procedures=list(procedures),
                trials=int(trials),
                widen={} if own else factors,
                target_params=None if own else target,
                ratio=pruned_size["param_ratio"],
                unit="params",
                training=TrainConfig(**form_values(TrainConfig, "expand-training")),
                finetune_epochs=int(finetune),
                analysis=result.config.options(),
            )
            submit_expand_study(
                workspace(),
                config,
                name=f"expand-{record['id']} {record['name']}",
                placement=current_placement(),
            )
            st.success(
                f"Queued an expand study of {len(config.runs)} runs on {plain(placement_caption())}; it runs in the "
                "background, survives closing the tab, and is also on the Studies page."
            )


def launched_studies(record: dict) -> None:
    """The expand studies launched from this analysis, the chosen one followed live."""
    st.subheader("Expand studies of this analysis")
    studies = [
        j
        for j in workspace().jobs()
        if j["kind"] == EXPAND_STUDY_KIND and j["name"].startswith(f"expand-{record['id']}")
    ]
    if not studies:
        st.info("No expand study launched for this analysis yet.")
    else:
        names = {j["id"]: f"{j['name']}  ·  {j['id']}" for j in reversed(studies)}
        shown = st.selectbox(
            "Study",
            list(names),
            format_func=lambda i: terminal_text(names.get(i)),
            key=f"expand-study-{record['id']}",
        )
        st.fragment(run_every=3)(expand_study_view)(shown)


st.title("Expand-pruning")
st.caption(
    "Paper sec. 3.4: widen the bottlenecks (x2), train, prune, fine-tune; compare with widening every layer by one "
    "factor of equal size (widen-pruning) and with pruning the plain network (train-pruning)."
)
record, result, workbench, ratio, unit = chosen_analysis("ex_ratio")
with user_errors("Slicing the pruning order"):
    mask = result.mask(workbench.structures, ratio, unit)
factors = edited_factors(record, result, layer_table(workbench.structures, mask))
pruned_size = mask_summary(workbench.structures, mask)
size_metrics(record, workbench, factors, pruned_size["params_after"])
launch_form(record, result, factors, pruned_size)
launched_studies(record)
