"""SOSP Lab entry point: `streamlit run app/main.py` serves the dashboard (`app/dashboard.py`) behind the server's
own-origin guard (`app/server_guard.py`), which Streamlit's settings alone do not give."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from app.server_guard import SameOriginOnly  # noqa: E402

app = st.App(Path(__file__).with_name("dashboard.py"), middleware=[Middleware(SameOriginOnly)])
