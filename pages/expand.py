"""Expand-pruning page: widen the bottlenecks, match a widen-pruning baseline, launch the runs, watch them, compare."""
import pandas as pd
import streamlit as st

from app.charts import accuracy_vs_size
from app.export import export_buttons
from app.guard import user_errors
from app.placement import current_placement, placement_caption
from app.pickers import chosen_analysis
from app.state import workspace
from sosp_engine.bottlenecks import find_bottlenecks
from sosp_engine.experiments import ExperimentConfig, compare_runs
from sosp_engine.jobs import submit
from sosp_engine.masks import layer_table, mask_summary
from sosp_engine.surgery import build_widened, params_of, uniform_factor

st.title("Expand-pruning")
st.caption("Paper sec. 3.4: widen the bottlenecks (x2), train, prune, fine-tune; compare with widening every layer by one "
           "factor of equal size (widen-pruning) and with pruning the plain network (train-pruning).")
record, result, workbench, ratio, unit = chosen_analysis("ex_ratio")
chosen = st.session_state.get("bottleneck_choice")
if chosen and chosen["analysis"] == record["id"]:  # what the Bottlenecks page flagged for this analysis
    level, picked = chosen["level"], set(chosen["units"])
    source = f"the {len(picked)} {level}(s) flagged on the Bottlenecks page"
else:
    level = "stage" if result.config.model_spec.startswith("resnet") else "layer"
    picked = None
    source = f"the {'least pruned stage' if level == 'stage' else 'five least pruned layers'} (no choice made on the Bottlenecks page)"
with user_errors("Finding bottlenecks"):
    units, info = find_bottlenecks(layer_table(workbench.structures, result.mask(workbench.structures, ratio, unit)),
                                   level, "least", n=1 if level == "stage" else 5)
flags = units.unit.isin(picked) if picked is not None else units.flagged
defaults = pd.DataFrame({"unit": units.unit, "pruning_ratio": units.pruning_ratio, "factor": [2.0 if f else 1.0 for f in flags]})
st.markdown(f"Pre-filled: {source}, x2 (edit any factor).")
edited = st.data_editor(defaults, hide_index=True, disabled=["unit", "pruning_ratio"],
                        key=f"factors-{record['id']}-{level}-{sorted(picked) if picked is not None else 'auto'}",
                        column_config={"factor": st.column_config.NumberColumn("width factor", min_value=0.25, max_value=8.0, step=0.25),
                                       "pruning_ratio": st.column_config.NumberColumn("pruning ratio", format="percent")})
factors = {u: float(f) for u, f in zip(edited.unit, edited.factor) if abs(f - 1.0) > 1e-9}
spec = result.config.model_spec
data = workbench.data


@st.cache_data(show_spinner="Sizing the widened networks ...")
def sizes(spec: str, data_spec: str, factors_items: tuple, key: str) -> tuple[int, int, float, int]:
    wide, _ = build_widened(spec, data.num_classes, data.input_shape[0], workbench.structures, dict(factors_items), workbench.example)
    expanded = params_of(wide)
    factor, matched = uniform_factor(spec, data.num_classes, data.input_shape[0], workbench.structures, expanded, workbench.example)
    return params_of(workbench.model), expanded, factor, matched


with user_errors("Widening"):
    base_params, expanded_params, factor, matched = sizes(spec, result.config.data_spec, tuple(sorted(factors.items())), record["id"])
target = mask_summary(workbench.structures, result.mask(workbench.structures, ratio, unit))["params_after"]
base_macs = workbench.structures.counts()[1]
cols = st.columns(5)
cols[0].metric("Plain net (params)", f"{base_params:,}")
cols[1].metric("Expanded net (params)", f"{expanded_params:,}", f"+{expanded_params / base_params - 1:.0%}")
cols[2].metric("Widen-pruning factor", f"x{factor:.3f}", help="one factor for every layer giving the expanded size")
cols[3].metric("Widened net (params)", f"{matched:,}", f"{matched - expanded_params:+,} vs expanded", delta_color="off")
cols[4].metric("Pruning target (params)", f"{target:,}", help="every run is pruned to the size of the train-pruned plain net")

with st.form("launch"):
    c = st.columns(4)
    procedures = c[0].multiselect("Runs", ["expand-prune", "widen-prune", "train-prune"], ["expand-prune", "widen-prune", "train-prune"])
    trials = c[1].number_input("Trials", 1, 10, 1)
    epochs = c[2].number_input("Epochs (train)", 1, 1000, 10)
    finetune = c[3].number_input("Epochs (fine-tune)", 1, 1000, 10)
    launch = st.form_submit_button("Launch as background jobs", type="primary", icon=":material/rocket_launch:")
if launch:
    with user_errors("Launching"):
        group = f"expand-{record['id']}"
        for trial in range(int(trials)):
            for procedure in procedures:
                config = ExperimentConfig(
                    procedure=procedure, model_spec=spec, data_spec=result.config.data_spec, epochs=int(epochs),
                    finetune_epochs=int(finetune), method=result.config.method, samples=result.config.samples, ratio=ratio,
                    unit=unit, cap=result.config.cap, normalize=result.config.normalize, widen=factors if procedure == "expand-prune" else {},
                    widen_factor=factor if procedure == "widen-prune" else None, seed=trial, label=procedure,
                    target_params=None if procedure == "train-prune" else target, exclude=list(result.config.exclude),
                    preset=result.config.preset)
                submit(workspace(), config, name=f"{group} {procedure} trial {trial}", placement=current_placement())
        st.success(f"Queued {int(trials) * len(procedures)} jobs on {placement_caption()}; they run as its devices "
                   "allow and survive closing the tab.")


@st.fragment(run_every=3)
def live_results(group: str) -> None:
    jobs = [j for j in workspace().jobs() if j["name"].startswith(group)]
    if not jobs:
        st.info("No runs launched for this analysis yet.")
        return
    for job in jobs:
        st.progress(min(job["progress"], 1.0), text=f"{job['name']}: {job['status']} — {job['message']}")
    summaries = [j["result"] for j in jobs if j["status"] == "done" and j["result"]]
    table = compare_runs(summaries)
    if not table.empty:
        plain = [s["stages"]["train"] for s in summaries if s["procedure"] == "train-prune" and "train" in s["stages"]]
        for size, base in (("params", base_params), ("macs", base_macs)):
            reference = (base, sum(p["test_acc"] for p in plain) / len(plain)) if plain else None
            fig = accuracy_vs_size(table, size, reference)
            st.plotly_chart(fig, key=f"acc-{size}-{len(summaries)}")
            export_buttons(fig, table, f"{group}-results-{size}")
        st.caption("Matched in parameters; the MACs chart shows what each procedure costs at inference. The star is the "
                   "unpruned plain net (its accuracy from the train-prune runs' training stage).")
        st.dataframe(table, hide_index=True)


st.subheader("Runs and results")
live_results(f"expand-{record['id']}")
