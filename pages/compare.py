"""Train vs init (or any two analyses): profiles side by side and overlaid, per-layer difference, overlap,
rank correlation."""

import streamlit as st

from app.charts import compare_overlay, difference_bars, ratio_profiles_chart, side_by_side
from app.export import export_buttons, file_slug
from app.guard import user_errors
from app.pickers import analysis_picker, ratio_picker, unique_labels
from app.report import analysis_report
from app.state import analysis, workbench_for, workspace
from app.text import plain, text_only
from sosp_engine.experiments.compare import compare_analyses
from sosp_engine.pruning.masks import ratio_profiles
from sosp_engine.shown import terminal_text


def picked_pair() -> tuple[dict, dict]:
    """The two analyses compared (the page stops until both are chosen)."""
    cols = st.columns(2)
    with cols[0]:
        first = analysis_picker("First analysis (a)", key="compare_a", default_index=1)
    with cols[1]:
        second = analysis_picker("Second analysis (b)", key="compare_b", default_index=0)
    if first is None or second is None:
        st.stop()
    return first, second


def overlap_metrics(table, overall: dict) -> None:
    """How much the two masks share, and what each removes."""
    metric_cols = st.columns(4)
    metric_cols[0].metric("Mask overlap (Jaccard)", f"{overall['jaccard']:.2f}")
    metric_cols[1].metric("Shared pruned structures", f"{overall['shared']:,}")
    metric_cols[2].metric(
        "Rank correlation of saliencies",
        f"{overall['rank_correlation']:.2f}",
        help="Spearman, over all structures",
    )
    metric_cols[3].metric("Largest layer difference", f"{table.ratio_difference.abs().max():.0%}")
    units = st.columns(2)
    for col, side in zip(units, "ab"):
        col.caption(
            f"Mask {plain(side)} removes {overall[f'param_ratio_{side}']:.1%} of the parameters and "
            f"{overall[f'mac_ratio_{side}']:.1%} of the MACs: compare methods at equal parameters or MACs, "
            "not equal structure counts."
        )


def comparison_charts(first: dict, second: dict, table, overall: dict, ratio: float, unit: str) -> None:
    """The profiles side by side, overlaid and differenced, the per-layer table and the report."""
    name_a, name_b = f"a: {first['name']}", f"b: {second['name']}"
    figures = [
        side_by_side(table, name_a, name_b),
        compare_overlay(table, name_a, name_b),
        difference_bars(table, name_a, name_b),
    ]
    for i, fig in enumerate(figures):
        st.plotly_chart(text_only(fig), key=f"cmp{i}")
        export_buttons(fig, table, f"compare-{i} {first['name']} vs {second['name']} {ratio:.0%} of {unit}")
    st.subheader("Per-layer comparison")
    st.dataframe(table, hide_index=True)
    report = analysis_report(
        f"SOSP Lab comparison: {first['name']} vs {second['name']}",
        {"a": first["name"], "b": second["name"], "ratio": ratio, "unit": unit, **overall},
        figures,
        {"Per-layer comparison": table},
    )
    st.download_button(
        "Comparison report (HTML)",
        report,
        file_slug(f"comparison {first['name']} vs {second['name']}") + ".html",
        "text/html",
        icon=":material/description:",
    )


def several_analyses(first: dict, workbench, ratio: float, unit: str) -> None:
    """The ratio profiles of any number of analyses of the same model and data."""
    st.subheader("Several analyses at once")
    same = [
        r
        for r in workspace().analyses()
        if r["model_spec"] == first["model_spec"] and r["data_spec"] == first["data_spec"]
    ]
    names = unique_labels({r["id"]: f"{r['name']} ({r['method']})" for r in same})
    picked = st.multiselect(
        "Analyses of this model (any number)",
        list(names),
        default=list(names)[:4],
        format_func=lambda i: terminal_text(names.get(i)),
        key=f"profiles-{first['id']}",
    )
    if picked:
        with user_errors("Comparing the analyses"):
            masks = {names[i]: analysis(i).mask(workbench.structures, ratio, unit) for i in picked}
            profiles = ratio_profiles(workbench.structures, masks)
        fig = ratio_profiles_chart(
            profiles, list(masks), f"Layer-wise pruning ratios at {ratio:.0%} of {unit}"
        )
        st.plotly_chart(text_only(fig), key="profiles")
        export_buttons(fig, profiles, f"profiles {len(masks)} analyses {ratio:.0%} of {unit}")


st.title("Train vs init")
st.caption(
    "Compare the masks of two analyses of one architecture, e.g. SOSP after training and SOSP at "
    "initialisation (paper Fig. 3)."
)
first, second = picked_pair()
with user_errors("Loading the analyses"):
    result_a, result_b = analysis(first["id"]), analysis(second["id"])
    workbench = workbench_for(result_a)
ratio, unit = ratio_picker(min(result_a.max_ratio, result_b.max_ratio), key="compare_ratio")
with user_errors("Comparing"):
    table, overall = compare_analyses(workbench.structures, result_a, result_b, ratio, unit)
overlap_metrics(table, overall)
comparison_charts(first, second, table, overall, ratio, unit)
several_analyses(first, workbench, ratio, unit)
