"""Export of every chart for design reviews: PNG and SVG (kaleido + a Chromium), standalone HTML, and the data
as CSV."""

from __future__ import annotations

import hashlib
import re

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app.text import plain, text_only
from sosp_engine.shown import safe_csv


@st.cache_data(show_spinner="Rendering the image ...", max_entries=64)
def _static_image(fig_json: str, fmt: str) -> bytes:
    import plotly.io as pio

    return pio.from_json(fig_json).to_image(
        format=fmt, width=1200, height=600, scale=2 if fmt == "png" else 1
    )


def file_slug(name: str) -> str:
    """A file name from a human title: letters, digits, '.', '_' and '-' only (an analysis name, a ratio, a unit)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("%", "pct")).strip("-.")
    return slug[:120] or "export"


def chart_html(fig: go.Figure) -> str:
    """A standalone interactive HTML page of the figure (plotly.js inlined, works offline)."""
    return fig.to_html(include_plotlyjs=True, full_html=True)


def export_buttons(fig: go.Figure, data: pd.DataFrame, name: str) -> None:
    """Download buttons under a chart: PNG, SVG, HTML, CSV. Static formats need a Chromium; HTML always works."""
    fig = text_only(fig)
    key = hashlib.md5(f"{name}{fig.to_json()[:2000]}".encode()).hexdigest()[:10]
    name = file_slug(name)
    cols = st.columns(4)
    cols[2].download_button(
        "HTML", chart_html(fig), f"{name}.html", "text/html", key=f"html-{key}", icon=":material/code:"
    )
    cols[3].download_button(
        "CSV", safe_csv(data), f"{name}.csv", "text/csv", key=f"csv-{key}", icon=":material/table:"
    )
    if not st.session_state.get(f"static-{key}"):
        if cols[0].button(
            "PNG / SVG",
            key=f"prep-{key}",
            icon=":material/image:",
            help="render static images (needs a Chromium)",
        ):
            st.session_state[f"static-{key}"] = True
            st.rerun()
        return
    try:
        fig_json = fig.to_json()
        png, svg = _static_image(fig_json, "png"), _static_image(fig_json, "svg")
    except Exception as exc:  # kaleido raises its own types when no Chromium is found
        cols[0].info(
            f"PNG/SVG need a Chromium browser on this machine (apt install chromium): {plain(type(exc).__name__)}. "
            "HTML and CSV still work."
        )
        return
    cols[0].download_button("PNG", png, f"{name}.png", "image/png", key=f"png-{key}", icon=":material/image:")
    cols[1].download_button(
        "SVG", svg, f"{name}.svg", "image/svg+xml", key=f"svg-{key}", icon=":material/image:"
    )
