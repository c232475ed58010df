"""Tables as a reviewer reads them: readable column names with their meaning, counts with separators, accuracies and
ratios in percent like the charts beside them, full layer names, and no spread claimed from a single trial."""

from __future__ import annotations

import pandas as pd
import streamlit as st

PERCENT = ("acc", "ratio", "network_mean", "target")
MAX_TEXT_WIDTH = 360  # pixels
COUNTS = ("params", "macs", "channels", "kept", "pruned", "structures")
HELP = {
    "layer": "the coupled channel group's name (its first producer)",
    "depth": "the group's position from the input",
    "kernel": "the mean kernel side over the group's producers: 3 when all are 3x3 convs; a coupled group that mixes a "
    "7x7 stem with 1x1 and 3x3 convs lies between",
    "structure_size": "channels removed together as one structure (equal per group around grouped convs and "
    "GroupNorm)",
    "score": "how many standard deviations the unit's pruning ratio lies below the network mean",
    "seeds": "trials averaged (n); a spread needs n >= 2",
    "trials": "trials averaged (n); a spread needs n >= 2",
}
NAMES = {
    "structure_size": "channels per structure",
    "kernel": "mean kernel side",
    "network_mean": "network mean ratio",
    "pruning_ratio": "pruning ratio",
    "acc_pruned": "accuracy pruned",
    "acc_finetuned": "accuracy fine-tuned",
    "latency_cpu_ms": "CPU latency (ms)",
    "latency_gpu_ms": "GPU latency (ms)",
}


def _label(column: str) -> str:
    """'params_before' -> 'params before', 'acc_pruned_mean' -> 'accuracy pruned (mean)'."""
    for suffix in ("_mean", "_std"):
        if column.endswith(suffix):
            return f"{_label(column[: -len(suffix)])} ({suffix[1:]})"
    return NAMES.get(column, column.replace("_", " "))


def column_config(frame: pd.DataFrame) -> dict:
    """Streamlit column settings for the known columns of `frame`."""
    config = {}
    for column in frame.columns:
        label, help_text = _label(str(column)), HELP.get(str(column))
        numeric = pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(
            frame[column]
        )
        if column == "pruning_ratio":
            config[column] = st.column_config.ProgressColumn(
                label, format="percent", min_value=0, max_value=1
            )
        elif numeric and any(str(column).startswith(p) or p in str(column) for p in PERCENT):
            config[column] = st.column_config.NumberColumn(label, format="percent", help=help_text)
        elif numeric and any(str(column).startswith(c) for c in COUNTS):
            config[column] = st.column_config.NumberColumn(label, format="localized", help=help_text)
        elif numeric:
            config[column] = st.column_config.NumberColumn(label, help=help_text)
        else:  # wide enough for the longest entry (a layer name, an id), within reason; the rest stays visible
            longest = max([len(str(v)) for v in frame[column]] + [len(label)])
            width = min(MAX_TEXT_WIDTH, 24 + 7 * longest)
            config[column] = st.column_config.TextColumn(label, help=help_text, width=width)
    return config


def shown_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as shown: no spread where one trial was averaged, no literal None in text columns."""
    frame = frame.copy()
    n = frame["seeds"] if "seeds" in frame else frame["trials"] if "trials" in frame else None
    if n is not None:
        for column in [c for c in frame.columns if str(c).endswith("_std")]:
            percent = any(p in str(column) for p in PERCENT)
            frame[column] = [
                (f"{v:.1%}" if percent else f"{v:,.3g}") if count > 1 and v == v else "n/a (one trial)"
                for v, count in zip(frame[column], n)
            ]  # text, so a single trial shows no 0 % and no 'None
    for column in frame.columns:
        if pd.api.types.is_object_dtype(frame[column]) or pd.api.types.is_string_dtype(frame[column]):
            frame[column] = frame[column].map(lambda v: "" if v is None or v is pd.NA or v != v else v)
    return frame


def table(frame: pd.DataFrame, **kwargs) -> None:
    """st.dataframe of `frame` with readable, formatted columns (see column_config and shown_frame)."""
    shown = shown_frame(frame)
    st.dataframe(shown, hide_index=True, column_config=column_config(shown), **kwargs)
