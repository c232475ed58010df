"""Pruning ratios page: the layer-wise pruning-ratio histogram of an analysis, re-sliced instantly by a global ratio."""
import streamlit as st

from app.charts import ratio_histogram, width_profile
from app.export import export_buttons
from app.guard import user_errors
from app.pickers import chosen_analysis
from app.report import analysis_report
from sosp_engine.masks import layer_table, mask_summary

st.title("Pruning ratios")
record, result, workbench, ratio, unit = chosen_analysis("ratio")
with user_errors("Slicing the pruning order"):
    mask = result.mask(workbench.structures, ratio, unit)
table = layer_table(workbench.structures, mask)
summary = mask_summary(workbench.structures, mask)

cols = st.columns(4)
cols[0].metric("Structures pruned", f"{summary['structures_pruned']:,} / {summary['structures']:,}", f"{summary['structure_ratio']:.1%}", delta_color="off")
cols[1].metric("Parameters", f"{summary['params_after']:,}", f"-{summary['param_ratio']:.1%}", delta_color="inverse")
cols[2].metric("MACs / sample", f"{summary['macs_after']:,}", f"-{summary['mac_ratio']:.1%}", delta_color="inverse")
cols[3].metric("Method", result.config.method, "at init" if result.config.at_init else "trained weights", delta_color="off")

hist = ratio_histogram(table, f"{record['name']}: layer-wise pruning ratios at {ratio:.0%} of {unit}")
st.plotly_chart(hist, key="hist")
export_buttons(hist, table, f"pruning-ratios-{record['id']}")
profile = width_profile(table, "Kept width per layer")
st.plotly_chart(profile, key="profile")
export_buttons(profile, table[["layer", "depth", "stage", "channels", "kept"]], f"width-profile-{record['id']}")
st.subheader("Per-layer table")
st.dataframe(table, hide_index=True, column_config={"pruning_ratio": st.column_config.ProgressColumn("pruning ratio", format="percent", min_value=0, max_value=1)})
report = analysis_report(f"SOSP Lab analysis: {record['name']}", {**record["config"], "ratio": ratio, "unit": unit,
                         **{k: v for k, v in summary.items()}}, [hist, profile], {"Per-layer table": table})
st.download_button("Analysis report (HTML)", report, f"report-{record['id']}.html", "text/html", icon=":material/description:")
