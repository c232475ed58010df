"""Pickers shared by pages: a stored analysis, a ratio with its unit."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.guard import user_errors
from app.state import analysis, kept, workbench_for, workspace
from sosp_engine.shown import terminal_text


def unique_labels(labels: dict[str, str]) -> dict[str, str]:
    """{id: label} with the id added to every label that another id shares, so that a picker, a legend or a table
    never merges two records under one name."""
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {key: label if counts[label] == 1 else f"{label} · {key}" for key, label in labels.items()}


CURRENT_ANALYSIS = "last_analysis"


def default_analysis(records: list[dict]) -> str:
    """The analysis a page opens on before one was chosen: the newest on trained weights that a person ran (not one a
    job listed, not one at initialisation), else the newest."""
    for record in records:
        config = record["config"]
        if not config.get("at_init") and not record["name"].endswith(")"):
            return record["id"]
    return records[0]["id"]


def analysis_picker(label: str = "Analysis", key: str = "analysis", default_index: int = 0) -> dict | None:
    """Select one stored analysis; None (with a hint) when the workspace has none yet."""
    records = workspace().analyses()
    if not records:
        st.info("No analysis in this workspace yet: run one on the **Analyse** page.")
        return None
    names = {r["id"]: f"{r['name']}  ·  {r['model_spec']}  ·  {r['id']}" for r in records}
    chosen = st.session_state.get(CURRENT_ANALYSIS) if key == "analysis" else None
    ids = list(names)
    if key == "analysis" and chosen not in ids:
        chosen = default_analysis(records)
    index = ids.index(chosen) if chosen in ids else min(default_index, len(ids) - 1)
    record_id = st.selectbox(
        label, ids, index=index, format_func=lambda i: terminal_text(names.get(i)), key=key
    )
    if key == "analysis":
        st.session_state[CURRENT_ANALYSIS] = record_id  # the analysis every page opens on until changed here
    return next(r for r in records if r["id"] == record_id)


def ratio_picker(max_ratio: float, key: str = "ratio", default: float = 0.5) -> tuple[float, str]:
    """A global pruning-ratio slider with its unit (structures / params / MACs)."""
    cols = st.columns([3, 1])
    unit = cols[1].radio("Unit", ["structures", "params", "macs"], key=kept(f"{key}-unit", "structures"))
    top = max(round(max_ratio if unit == "structures" else 0.99, 2), 0.01)
    value_key = kept(f"{key}-value", min(default, top))
    st.session_state[value_key] = min(st.session_state[value_key], top)  # a unit with a lower ceiling
    ratio = cols[0].slider(
        f"Global pruning ratio ({unit})",
        0.0,
        top,
        step=0.01,
        key=value_key,
        help="A mask at any ratio is a prefix of the stored pruning order: moving this recomputes nothing.",
    )
    return ratio, unit


def chosen_analysis(ratio_key: str):
    """Pick a stored analysis, load it and its workbench, and pick a ratio: (record, result, workbench, ratio, unit).

    Stops the page (with a hint or an st.error) when there is nothing to show.
    """
    record = analysis_picker()
    if record is None:
        st.stop()
    with user_errors("Loading the analysis"):
        result = analysis(record["id"])
        workbench = workbench_for(result)
    ratio, unit = ratio_picker(result.max_ratio, key=ratio_key)
    return record, result, workbench, ratio, unit


def analyses_frame(records: list[dict]) -> pd.DataFrame:
    """One row per stored analysis: name, method, model, data, at init, N', compute seconds, id."""
    return pd.DataFrame(
        [
            {
                "name": r["name"],
                "method": r["method"],
                "model": r["model_spec"],
                "data": r["data_spec"],
                "at init": r["config"]["at_init"],
                "N'": r["config"]["samples"],
                "seconds": round(sum(r["summary"]["timings"].values()), 2),
                "id": r["id"],
            }
            for r in records
        ]
    )
