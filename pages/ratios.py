"""Pruning ratios page: the layer-wise pruning-ratio histogram of an analysis, re-sliced instantly by a global ratio."""

import streamlit as st

from sosp_engine.pruning.export import export_pruned

from app.text import plain, text_only

from app.charts import ratio_histogram, width_profile
from app.export import export_buttons, file_slug
from app.guard import user_errors
from app.pickers import chosen_analysis
from app.latency_view import deployment_section, latency_section
from app.sensitivity_view import sensitivity_section
from app.report import review_report
from app.review import review_of
from app.tables import table as show_table
from sosp_engine.experiments.review import mask_accuracy
from sosp_engine.pruning.exactness import exactness_line
from sosp_engine.pruning.masks import layer_table, mask_json, mask_summary


def mask_metrics(summary: dict, result) -> None:
    """What the mask removes, by method and weights."""
    cols = st.columns(4)
    cols[0].metric(
        "Structures pruned",
        f"{summary['structures_pruned']:,} / {summary['structures']:,}",
        f"{summary['structure_ratio']:.1%} of all",
        delta_color="off",
        delta_arrow="off",
    )
    cols[1].metric(
        "Parameters",
        f"{summary['params_after']:,}",
        f"{summary['param_ratio']:.1%} fewer",
        delta_color="off",
        delta_arrow="down",
    )
    cols[2].metric(
        "MACs / sample",
        f"{summary['macs_after']:,}",
        f"{summary['mac_ratio']:.1%} fewer",
        delta_color="off",
        delta_arrow="down",
    )
    cols[3].metric("Method", result.config.method)
    cols[3].caption(plain(result.config.weights_label()))


def exactness_notes(result) -> None:
    """Whether removing the mask's structures equals zeroing them, layer by layer where not."""
    if result.exactness:
        line = exactness_line(result.exactness)
        (st.caption if result.exactness["exact"] else st.warning)(plain(line))
        if not result.exactness["exact"]:
            st.dataframe(
                {
                    "layer": list(result.exactness["approximate_layers"]),
                    "why removal differs from zeroing": list(result.exactness["approximate_layers"].values()),
                },
                hide_index=True,
            )


def ratio_charts(record: dict, table, ratio: float, unit: str) -> list:
    """The ratio histogram, the width profile and the per-layer table; returns the figures for the report."""
    hist = ratio_histogram(table, f"{record['name']}: layer-wise pruning ratios at {ratio:.0%} of {unit}")
    st.plotly_chart(text_only(hist), key="hist")
    export_buttons(hist, table, f"pruning-ratios {record['name']} {ratio:.0%} of {unit}")
    profile = width_profile(table, "Kept width per layer")
    st.plotly_chart(text_only(profile), key="profile")
    export_buttons(
        profile,
        table[["layer", "depth", "stage", "channels", "kept"]],
        f"width-profile {record['name']} {ratio:.0%} of {unit}",
    )
    st.subheader("Per-layer table")
    show_table(table)
    return [hist, profile]


def review_downloads(
    record: dict, result, workbench, mask: set[str], ratio: float, unit: str, table, figures
) -> None:
    """The design review report, with the accuracy measured on request."""
    review = review_of(record, result, workbench, mask, ratio, unit, table, figures)
    cols = st.columns([1, 3])
    if cols[0].button(
        "Measure accuracy for the report",
        icon=":material/speed:",
        help="test split, before and right after pruning",
    ):
        with user_errors("Measuring the accuracy", stop=False):
            st.session_state[("review-accuracy", record["id"], len(mask))] = mask_accuracy(workbench, mask)
            st.rerun()
    if review.accuracy is not None:
        cols[0].caption(
            f"Test accuracy {review.accuracy.before:.2%} before pruning, {review.accuracy.after_pruning:.2%} right "
            "after (in the report)"
        )
    report = review_report(review)
    cols[1].download_button(
        "Design review report (HTML)",
        report,
        file_slug(f"report {record['name']} {ratio:.0%} of {unit}") + ".html",
        "text/html",
        icon=":material/description:",
    )


def mask_downloads(record: dict, result, workbench, mask: set[str], ratio: float, unit: str) -> None:
    """The mask as JSON and the pruned model (.pt, .onnx), prepared on request."""
    name = f"{record['name']}-{ratio:.0%}-{unit}".replace(" ", "_").replace("%", "pct")
    cols = st.columns(2)
    cols[0].download_button(
        "Mask (JSON)",
        mask_json(workbench.structures, mask, method=result.config.method, ratio=ratio, unit=unit),
        f"mask-{name}.json",
        "application/json",
        icon=":material/download:",
    )
    if cols[1].button(
        "Prepare the pruned model",
        icon=":material/content_cut:",
        help="prune physically; the checkpoint reopens on the Model page with the same model spec",
    ):
        with user_errors("Pruning the model", stop=False):
            export = export_pruned(workbench, mask, seed=result.config.seed)
            st.session_state[("pruned-model", name)] = export.checkpoint_bytes()
            st.session_state[("pruned-exactness", name)] = export.exactness
            st.session_state[("pruned-onnx", name)] = (export.onnx, export.onnx_line + ".")
    if ("pruned-model", name) in st.session_state:
        measured = st.session_state[("pruned-exactness", name)]
        (cols[1].caption if measured["exact"] else cols[1].warning)(plain(exactness_line(measured)))
    if ("pruned-onnx", name) in st.session_state:
        exported, line = st.session_state[("pruned-onnx", name)]
        if exported is not None:
            cols[1].download_button(
                "Pruned model (.onnx)",
                exported,
                f"pruned-{name}.onnx",
                "application/octet-stream",
                icon=":material/download:",
            )
        cols[1].caption(plain(line))
        cols[1].download_button(
            "Pruned model (.pt)",
            st.session_state[("pruned-model", name)],
            f"pruned-{name}.pt",
            "application/octet-stream",
            icon=":material/download:",
        )


st.title("Pruning ratios")
record, result, workbench, ratio, unit = chosen_analysis("ratio")
with user_errors("Slicing the pruning order"):
    mask = result.mask(workbench.structures, ratio, unit)
table = layer_table(workbench.structures, mask)
mask_metrics(mask_summary(workbench.structures, mask), result)
exactness_notes(result)
figures = ratio_charts(record, table, ratio, unit)
review_downloads(record, result, workbench, mask, ratio, unit, table, figures)
mask_downloads(record, result, workbench, mask, ratio, unit)
sensitivity_section(record, ratio, unit)
deployment_section(record, result, workbench)
latency_section(record, result, workbench)
