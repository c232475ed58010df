"""The design review of the analysis a page shows: what was measured for it in this session, gathered for the
report (accuracy, trust verdicts, the latency profile stored with the analysis)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app.report import Review
from app.state import workspace
from sosp_engine.experiments.bottlenecks import explain, find_bottlenecks
from sosp_engine.experiments.review import weights_origin
from sosp_engine.latency.profile import PROFILE_NAME, LatencyProfile
from sosp_engine.pruning.exactness import exactness_line
from sosp_engine.pruning.masks import mask_summary
from sosp_engine.pruning.workbench import Workbench
from sosp_engine.saliency.analysis import AnalysisResult


def review_of(
    record: dict,
    result: AnalysisResult,
    workbench: Workbench,
    mask: set[str],
    ratio: float,
    unit: str,
    table: pd.DataFrame,
    figures: list[go.Figure],
) -> Review:
    """The review of `record` at `mask`, with whatever was measured for it (the rest says how to measure it)."""
    bottlenecks, rule = find_bottlenecks(table)
    profile_path = Path(record["path"]) / PROFILE_NAME
    latency = LatencyProfile.load(profile_path).describe_at(len(mask)) if profile_path.is_file() else None
    return Review(
        name=f"SOSP Lab design review: {record['name']}",
        config=result.config,
        weights_origin=weights_origin(result.config.setup.weights, workspace().root),
        ratio=ratio,
        unit=unit,
        summary=mask_summary(workbench.structures, mask),
        layers=table,
        bottlenecks=bottlenecks,
        bottleneck_text=explain(bottlenecks, rule),
        exactness=exactness_line(result.exactness) if result.exactness else "not measured for this analysis",
        figures=figures,
        accuracy=st.session_state.get(("review-accuracy", record["id"], len(mask))),
        trust=st.session_state.get(("trust-verdicts", record["name"]), []),
        latency=latency,
    )
