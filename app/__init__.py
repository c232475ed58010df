"""SOSP Lab dashboard: the Streamlit app on top of sosp_engine."""
