"""The latency sections of the Pruning ratios page: what the order's masks buy at deployment (latency drop against
MAC drop per runtime), and the mask that reaches a target latency drop on this machine."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app.charts import efficiency_chart, latency_profile_chart
from app.export import export_buttons, file_slug
from app.guard import user_errors
from app.state import kept
from app.text import plain, text_only
from sosp_engine.saliency.analysis import AnalysisResult
from sosp_engine.devices import resolve_device
from sosp_engine.latency.deployment import (
    DeploymentGrid,
    efficiency_summary,
    efficiency_table,
    order_variants,
)
from sosp_engine.latency.profile import (
    LATENCY_UNIT,
    PROFILE_NAME,
    matching_profile,
    LatencyTiming,
    latency_mask,
    measure_profile,
)
from sosp_engine.pruning.export import export_pruned
from sosp_engine.latency.runtimes import RUNTIMES
from sosp_engine.pruning.workbench import Workbench
from sosp_engine.pruning.masks import mask_json, mask_summary


RUNTIME_HELP = (
    "eager: PyTorch as the model runs in training code. onnxruntime: the net exported to ONNX and run in ONNX "
    "Runtime (BatchNorm folded, activations fused), as many models ship."
)


def deployment_section(record: dict, result: AnalysisResult, workbench: Workbench) -> None:
    """Time the net pruned along the order (and the order rounded) in each runtime and batch: latency drop against
    MAC drop, and their ratio."""
    st.subheader("What do these masks buy at deployment?")
    st.caption(
        "A mask removes MACs; whether it removes as much time depends on the runtime's kernels. The net pruned at "
        "a few points of this order (and of the order regrouped to multiples of 8 or 16) is timed in each runtime, "
        "alternately with the unpruned net. Efficiency = latency drop / MAC drop: 1 when every saved MAC is saved "
        "time."
    )
    cols = st.columns(5)
    runtimes = cols[0].multiselect(
        "Runtimes", RUNTIMES, key=kept("dep-runtimes", list(RUNTIMES)), help=RUNTIME_HELP
    )
    batches = cols[1].multiselect(
        "Batch sizes", [1, 8, 16, 32, 64, 128, 256], key=kept("dep-batches", [1, 64])
    )
    round_to = cols[2].selectbox(
        "Also rounded to", [1, 8, 16], key=kept("dep-round", 8), help="1: only as analysed"
    )
    points = cols[3].number_input("Points per order", 2, 21, key=kept("dep-points", 5))
    device = cols[4].selectbox("Timing device", ["auto", "cpu", "cuda"], key=kept("dep-device", "auto"))
    key = ("deployment", record["id"], tuple(runtimes), tuple(batches), int(round_to), int(points), device)
    if st.button("Measure what the masks buy", icon=":material/speed:", key="dep-run"):
        if not runtimes or not batches:
            st.error("Choose at least one runtime and one batch size, then measure again.")
            return
        bar = st.progress(0.0, text="starting ...")
        with user_errors("Measuring the deployment latency", stop=False):
            grid = DeploymentGrid(
                list(runtimes), [int(b) for b in batches], int(points), str(resolve_device(device))
            )
            st.session_state[key] = efficiency_table(
                workbench,
                order_variants(result, workbench.structures, [int(round_to)]),
                grid,
                progress=lambda f, m: bar.progress(f, text=plain(m)),
            )
        bar.empty()
    table = st.session_state.get(key)
    if table is None:
        return
    figure = efficiency_chart(table)
    st.plotly_chart(text_only(figure), key="dep-chart")
    export_buttons(figure, table, f"deployment {record['name']}")
    summary = efficiency_summary(table)
    st.caption(
        plain(
            f"Timed on {table['device'].iloc[0]} with {table['threads'].iloc[0]} threads, medians of 10 "
            "inferences per net. Efficiency per order, runtime and batch (median over the points, lowest, highest):"
        )
    )
    st.dataframe(
        summary.rename(
            columns={
                "order": "order",
                "runtime": "runtime",
                "batch": "batch",
                "efficiency_median": "efficiency (median)",
                "efficiency_min": "lowest",
                "efficiency_max": "highest",
                "prefixes": "points",
            }
        ),
        hide_index=True,
        column_config={
            c: st.column_config.NumberColumn(format="%.2f")
            for c in ("efficiency (median)", "lowest", "highest")
        },
    )


def latency_section(record: dict, result: AnalysisResult, workbench: Workbench) -> None:
    """Measure the analysis's latency profile on a device and batch (with a progress bar), then slice it at a target."""
    st.subheader("Prune to a latency target")
    st.caption(
        "Latency is far from proportional to MACs (odd widths, small layers). The net pruned along this "
        "analysis's order is timed at a dozen points, alternately with the unpruned net, on this machine; the "
        "mask is the shortest prefix whose interpolated latency reaches the target."
    )
    cols = st.columns(5)
    device = cols[0].selectbox("Timing device", ["auto", "cpu", "cuda"], key=kept("lat-device", "auto"))
    runtime = cols[1].selectbox("Runtime", RUNTIMES, key=kept("lat-runtime", RUNTIMES[0]), help=RUNTIME_HELP)
    batch = cols[2].number_input("Timed batch size", 1, 4096, key=kept("lat-batch", 1))
    points = cols[3].number_input("Timed points", 3, 41, key=kept("lat-points", 12))
    target = cols[4].slider("Latency drop", 0.0, 0.95, step=0.05, format="%.2f", key=kept("lat-target", 0.3))
    folder = Path(record["path"])
    timing = LatencyTiming(str(resolve_device(device)), int(batch), runtime, int(points))
    measure = st.button("Measure the latency profile", icon=":material/timer:", key="lat-run")
    if measure:  # timed again on every click (a profile follows the machine's load); stored with the analysis
        bar = st.progress(0.0, text="starting ...")
        with user_errors("Measuring the latency", stop=False):
            order = result.order(workbench.structures)
            progress = lambda f, m: bar.progress(f, text=plain(m))  # noqa: E731
            measure_profile(workbench, order, timing, progress).save(folder / PROFILE_NAME)
        bar.empty()
    profile = matching_profile(folder, timing.device, timing.batch, timing.runtime)
    if profile is None:
        return
    if not measure and target not in profile.refined_at:  # timing starts on a click, never on a visit
        st.info(
            plain(
                f"The profile stored with this analysis ({profile.where()}) has not timed the mask at a {target:.0%} "
                "drop yet."
            )
        )
        if not st.button("Time the mask at this target", icon=":material/timer:", key="lat-refine"):
            return
    mask = None
    with user_errors("Timing the mask at the latency target", stop=False):
        mask, profile = latency_mask(result, workbench, folder, target, timing)  # as the CLI and jobs get it
    if mask is None:  # refused (unresolvable, out of reach): the profile shows why
        st.plotly_chart(text_only(latency_profile_chart(profile, -1, target)), key="lat-chart")
        return
    latency_result(record, result, workbench, profile, mask, target)


def latency_result(
    record: dict, result: AnalysisResult, workbench: Workbench, profile, mask: set[str], target: float
) -> None:
    """The mask at a latency target: its measured latency with the spread, the profile chart, the downloads."""
    summary = mask_summary(workbench.structures, mask)
    measured = profile.at(len(mask))
    (st.success if measured.resolved and not profile.noise() else st.warning)(
        plain(
            f"In {profile.where()} the unpruned net takes {1000 * profile.reference_seconds:.2f} ms. Pruned at "
            f"{len(mask)} structures it measured {1000 * measured.seconds:.2f} ms: {measured.change()}, removing "
            f"{summary['param_ratio']:.1%} of the parameters and {summary['mac_ratio']:.1%} of the MACs."
        )
    )
    if noise := profile.noise_warning():
        st.warning(plain(noise[0].upper() + noise[1:] + "."))
    figure = latency_profile_chart(profile, len(mask), target)
    st.plotly_chart(text_only(figure), key="lat-chart")
    export_buttons(
        figure,
        pd.DataFrame({"structures_pruned": profile.prefixes, "relative_latency": profile.relative}),
        f"latency profile {record['name']}",
    )
    cols = st.columns(2)
    cols[0].download_button(
        "Mask at this latency (JSON)",
        mask_json(workbench.structures, mask, method=result.config.method, ratio=target, unit=LATENCY_UNIT),
        file_slug(f"mask {record['name']} {target:.0%} latency") + ".json",
        "application/json",
        icon=":material/download:",
        key="lat-mask",
    )
    if cols[1].button("Prune at this latency", icon=":material/content_cut:", key="lat-prune"):
        with user_errors("Pruning the model", stop=False):
            st.session_state[("lat-pruned", record["id"], len(mask))] = export_pruned(
                workbench, mask, onnx=False
            ).checkpoint_bytes()
    pruned = st.session_state.get(("lat-pruned", record["id"], len(mask)))
    if pruned is not None:
        cols[1].download_button(
            "Pruned model at this latency (.pt)",
            pruned,
            file_slug(f"pruned {record['name']} {target:.0%} latency") + ".pt",
            "application/octet-stream",
            icon=":material/download:",
            key="lat-pruned-download",
        )
