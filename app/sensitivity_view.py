"""The sensitivity section of the Pruning ratios page: curves of several analyses of one model, computed on demand."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.charts import calibration_chart, predicted_vs_measured, sensitivity_lines, trust_scatter
from app.export import export_buttons
from app.guard import user_errors
from app.pickers import unique_labels
from app.state import analysis, workbench_for, workspace
from app.text import plain, text_only
from sosp_engine.experiments.sensitivity import (
    Evaluation,
    distinct_masks,
    even_grid,
    max_reduction,
    sensitivity_curve,
)
from sosp_engine.experiments.trust import TrustPlan, trust_check
from sosp_engine.shown import terminal_text


def sensitivity_section(record: dict, ratio: float, unit: str) -> None:
    """Pick analyses of the same model and data, compute their curves with a progress bar, show and export them."""
    st.subheader("How far can it be pruned?")
    st.caption(
        "Validation loss and accuracy of the physically pruned net along each analysis's pruning order, next to "
        "the loss increase the method predicts. Nothing is retrained; each point is one evaluation."
    )
    same = [
        r
        for r in workspace().analyses()
        if (r["model_spec"], r["data_spec"]) == (record["model_spec"], record["data_spec"])
    ]
    names = unique_labels({r["id"]: r["name"] for r in same})
    cols = st.columns([3, 1, 1])
    chosen = cols[0].multiselect(
        "Analyses (same model and data)",
        list(names),
        default=[record["id"]],
        format_func=lambda i: terminal_text(names.get(i)),
        key=f"sens-analyses-{record['id']}",
    )
    points = cols[1].number_input("Points", 3, 41, 11, key="sens-points")
    samples = cols[2].number_input(
        "Samples",
        10,
        100_000,
        1000,
        step=100,
        key="sens-samples",
        help="evaluated on the first N samples of the validation split",
    )
    key = ("sensitivity", tuple(chosen), int(points), int(samples), unit)
    if st.button("Compute the curves", icon=":material/show_chart:", disabled=not chosen, key="sens-run"):
        curves = {}
        bar = st.progress(0.0, text="starting ...")
        with user_errors("The sensitivity curve", stop=False):
            for i, record_id in enumerate(chosen):
                result = analysis(record_id)
                workbench = workbench_for(result)
                grid = even_grid(
                    int(points), max_reduction(result, workbench.structures, unit), distinct_masks(result)
                )

                def progress(fraction: float, message: str, i: int = i) -> None:
                    bar.progress((i + fraction) / len(chosen), text=plain(f"{names[record_id]}: {message}"))

                curves[names[record_id]] = sensitivity_curve(
                    result, workbench, grid, unit, Evaluation(samples=int(samples)), progress
                )
            st.session_state[key] = curves
        bar.empty()
    curves = st.session_state.get(key)
    if curves:
        curves_view(record, curves, ratio, unit)
    trust_section(record, chosen, names, int(samples))


def curves_view(record: dict, curves: dict, ratio: float, unit: str) -> None:
    """The computed curves: accuracy and loss against the ratio, and predicted against measured along the order."""
    tables = {name: curve.table for name, curve in curves.items()}
    data = pd.concat([t.assign(analysis=name) for name, t in tables.items()], ignore_index=True)
    first = next(iter(curves.values()))
    st.caption(
        plain(
            f"Unpruned: accuracy {first.baseline_acc:.1%}, loss {first.baseline_loss:.4f} on {first.samples} "
            f"{first.split} samples."
        )
    )
    for metric in ("pruned_acc", "pruned_loss"):
        fig = sensitivity_lines(tables, metric, unit, ratio)
        st.plotly_chart(text_only(fig), key=f"sens-{metric}")
        export_buttons(fig, data, f"sensitivity {record['name']} {metric} {unit}")
    fig = predicted_vs_measured(tables, {name: curve.rank_correlation for name, curve in curves.items()})
    st.plotly_chart(text_only(fig), key="sens-predicted")
    export_buttons(fig, data, f"predicted-vs-measured {record['name']} {unit}")
    st.caption(
        plain(
            "Along one order: Spearman "
            + "; ".join(f"{name} {curve.rank_correlation:.2f}" for name, curve in curves.items())
            + ". Both curves grow with the prefix, so this is near 1 for any method; whether to trust the ranking "
            "is what the check below measures."
        )
    )


def trust_section(record: dict, chosen: list[str], names: dict[str, str], samples: int) -> None:
    """The trust meter: each analysis ranks independent masks (and the baselines the same masks), and its
    prediction is calibrated along its order; the verdict in words under the charts."""
    st.subheader("Can its ranking be trusted?")
    cols = st.columns(3)
    ratio = cols[0].number_input(
        "Mask size (share of structures)", 0.02, 0.9, 0.1, step=0.02, key="trust-ratio"
    )
    masks = cols[1].number_input("Masks", 8, 400, 64, step=8, key="trust-masks")
    factor = cols[2].number_input("Calibration factor", 1.1, 100.0, 2.0, step=0.5, key="trust-factor")
    key = ("trust", tuple(chosen), float(ratio), int(masks), float(factor), samples)
    if st.button("Check the ranking", icon=":material/verified:", disabled=not chosen, key="trust-run"):
        reports = {}
        bar = st.progress(0.0, text="starting ...")
        with user_errors("The trust check", stop=False):
            for i, record_id in enumerate(chosen):
                result = analysis(record_id)

                def progress(fraction: float, message: str, i: int = i) -> None:
                    bar.progress((i + fraction) / len(chosen), text=plain(f"{names[record_id]}: {message}"))

                plan = TrustPlan(float(ratio), int(masks), factor=float(factor))
                evaluation = Evaluation(samples=samples)
                reports[names[record_id]] = trust_check(
                    result, workbench_for(result), plan, evaluation, progress
                )
            st.session_state[key] = reports
            st.session_state[("trust-verdicts", record["name"])] = [
                f"Trust: {r.verdict}" for r in reports.values()
            ]
            st.rerun()  # the page's HTML report, built above this section, then carries the verdicts
        bar.empty()
    reports = st.session_state.get(key)
    if not reports:
        return
    for name, report in reports.items():
        (st.success if report.trusted else st.warning)(plain(f"{name}: {report.verdict}"))
    table = pd.DataFrame(
        [
            {
                "analysis": name,
                "score": report.score,
                **{f"{k} (same masks)": v for k, v in report.baseline_scores.items()},
                **{f"{k} masks": v for k, v in report.family_scores.items()},
                "masks": report.masks,
                "structures per mask": report.size,
            }
            for name, report in reports.items()
        ]
    )
    st.dataframe(table, hide_index=True)
    fig = trust_scatter(reports)
    st.plotly_chart(text_only(fig), key="trust-scatter")
    export_buttons(fig, table, f"trust-ranking {record['name']}")
    fig = calibration_chart(reports)
    st.plotly_chart(text_only(fig), key="trust-calibration")
    calibration = pd.concat(
        [pd.DataFrame(report.calibration).assign(analysis=name) for name, report in reports.items()],
        ignore_index=True,
    )
    export_buttons(fig, calibration, f"trust-calibration {record['name']}")
