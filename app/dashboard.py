"""The dashboard script: navigation over the pages and the sidebar (served by `app/main.py`)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app.guard import unexpected  # noqa: E402
from app.sidebar import render_sidebar, sidebar_threads  # noqa: E402

st.set_page_config(page_title="SOSP Lab", page_icon=str(ROOT / "assets" / "logo.svg"), layout="wide")

PAGES = [
    st.Page(ROOT / "pages" / "model.py", title="Model", icon=":material/memory:", default=True),
    st.Page(ROOT / "pages" / "analyse.py", title="Analyse", icon=":material/science:"),
    st.Page(ROOT / "pages" / "ratios.py", title="Pruning ratios", icon=":material/bar_chart:"),
    st.Page(ROOT / "pages" / "compare.py", title="Train vs init", icon=":material/compare_arrows:"),
    st.Page(ROOT / "pages" / "bottlenecks.py", title="Bottlenecks", icon=":material/filter_alt:"),
    st.Page(ROOT / "pages" / "expand.py", title="Expand-pruning", icon=":material/open_in_full:"),
    st.Page(ROOT / "pages" / "studies.py", title="Studies", icon=":material/leaderboard:"),
    st.Page(ROOT / "pages" / "runs.py", title="Runs", icon=":material/history:"),
]

navigation = st.navigation(PAGES)
threads = sidebar_threads()
sidebar = st.sidebar.container()
try:
    navigation.run()
except Exception as exc:  # a page's unforeseen error: one line and a log entry, never a traceback
    unexpected(f"The {navigation.title} page", exc)
finally:  # filled after the page ran (also after st.stop), so a model loaded or a job queued shows at once
    render_sidebar(sidebar, threads)
