"""Bottlenecks page: layers or stages SOSP prunes markedly less than the rest, with the evidence for each flag."""

import streamlit as st

from app.charts import ratio_histogram, saliency_scatter
from app.export import export_buttons
from app.guard import user_errors
from app.pickers import chosen_analysis
from app.text import text_only
from app.tables import table as show_table
from sosp_engine.saliency.attribution import channel_attribution, layer_channels, saliency_vs_attribution
from sosp_engine.experiments.bottlenecks import explain, find_bottlenecks, unit_ratios
from sosp_engine.pruning.masks import layer_table
from sosp_engine.progress import counted


def rule_controls() -> tuple[str, str, float, int]:
    """The level, the flag rule and its k or n."""
    cols = st.columns(3)
    level = cols[0].radio(
        "Level",
        ["layer", "stage"],
        horizontal=True,
        help="stages are the resolutions (for ResNets: the three stages)",
    )
    rule = cols[1].radio(
        "Rule",
        ["mean-std", "least"],
        horizontal=True,
        format_func={"mean-std": "ratio < mean - k x std", "least": "n least pruned"}.get,
    )
    k = cols[2].slider("k", 0.0, 3.0, 1.0, 0.1) if rule == "mean-std" else 1.0
    n = cols[2].number_input("n", 1, 50, 3) if rule == "least" else 3
    return level, rule, k, int(n)


def flags_section(record: dict, units, info: dict, level: str) -> list[str]:
    """Why units are flagged, and the link that widens them on the Expand page; returns the flagged units."""
    st.text(explain(units, info))
    flagged = list(units[units.flagged].unit)
    st.session_state["bottleneck_choice"] = {"analysis": record["id"], "level": level, "units": flagged}
    if flagged:
        st.page_link(
            "../pages/expand.py",
            label=f"Widen {'this' if len(flagged) == 1 else 'these'} {counted(len(flagged), level)} x2 on the "
            "Expand-pruning page",
            icon=":material/open_in_full:",
        )
    return flagged


def flags_chart(
    record: dict, table, units, info: dict, level: str, flagged: list[str], ratio: float, unit: str
) -> None:
    """The ratio histogram with the flag threshold, and the units ranked by score."""
    if level == "layer":
        fig = ratio_histogram(
            table, "Pruning ratios with the bottleneck threshold", info["threshold"], flagged
        )
    else:
        stage_table = unit_ratios(table, "stage").rename(columns={"unit": "layer"})
        stage_table = stage_table.assign(
            kept=stage_table.channels - stage_table.pruned,
            params_after=0,
            params_before=0,
            macs_after=0,
            macs_before=0,
        )
        fig = ratio_histogram(
            stage_table, "Stage pruning ratios with the bottleneck threshold", info["threshold"], flagged
        )
    st.plotly_chart(text_only(fig), key="bn_hist")
    export_buttons(fig, units, f"bottlenecks {record['name']} {ratio:.0%} of {unit} {level}")
    st.subheader("Ranked by score (std below the mean over units)")
    show_table(units)


def channels_section(result, workbench, mask: set[str], level: str, flagged: list[str]) -> str:
    """Each structure of a chosen layer with its saliency's parts; returns the layer."""
    st.subheader("What second order changes, channel by channel")
    layer = st.selectbox(
        "Layer",
        [l.name for l in workbench.structures.layers],
        index=[l.name for l in workbench.structures.layers].index(flagged[0])
        if level == "layer" and flagged
        else 0,
    )
    channels = layer_channels(
        result.keys, result.saliency, layer, mask, result.first_order, result.second_order
    )
    show_table(channels, height=min(400, 38 + 35 * len(channels)))
    st.caption(
        "Each structure of the layer: pruned or kept at this ratio, its saliency and the method's first- and "
        "second-order parts (SOSP-H: theta_s . g and theta_s . H theta_struc; SOSP-I: theta_s . g and Q's "
        "diagonal); rank 1 is pruned first."
    )
    return layer


def attribution_section(
    record: dict, result, workbench, mask: set[str], layer: str, ratio: float, unit: str
) -> None:
    """The saliency against a first-order attribution (captum), computed on request."""
    key = ("attribution", record["id"], layer, ratio, unit)
    if st.button("Compare with a first-order attribution (captum)", icon=":material/insights:"):
        with st.spinner("Computing gradient x activation ..."), user_errors("The attribution", stop=False):
            x, y = workbench.data.analysis_samples(min(result.config.samples, 500), result.config.seed)
            attribution = channel_attribution(workbench.model, workbench.structures, layer, x, y)
            st.session_state[key] = saliency_vs_attribution(
                result.keys, result.saliency, workbench.structures, layer, attribution, mask
            )
    if key in st.session_state:  # kept across reruns: a download click must not make the chart disappear
        frame = st.session_state[key]
        scatter = saliency_scatter(frame, layer)
        st.plotly_chart(text_only(scatter), key="scatter")
        export_buttons(scatter, frame, f"saliency-vs-attribution {record['name']} {layer}")
        st.caption(
            "On the dashed diagonal both orders agree; structures far from it are the ones whose second-order "
            "(correlation) terms change their rank."
        )


st.title("Bottlenecks")
record, result, workbench, ratio, unit = chosen_analysis("bn_ratio")
level, rule, k, n = rule_controls()
with user_errors("Finding bottlenecks"):
    mask = result.mask(workbench.structures, ratio, unit)
    table = layer_table(workbench.structures, mask)
    units, info = find_bottlenecks(table, level, rule, k, n)
flagged = flags_section(record, units, info, level)
flags_chart(record, table, units, info, level, flagged, ratio, unit)
layer = channels_section(result, workbench, mask, level, flagged)
attribution_section(record, result, workbench, mask, layer, ratio, unit)
