"""Where this session's background jobs run: this machine, or a Ray cluster (set on the Runs page, used by
every launch)."""

from __future__ import annotations

import os

import streamlit as st

from app.guard import user_errors
from app.text import plain
from sosp_engine.runs.jobs import RAY_ADDRESS_ENV, Placement, custom_resources
from sosp_engine.runs.backends.ray import cluster_summary
from sosp_engine.progress import counted

KEY = "placement"


def current_placement() -> Placement:
    """The placement chosen on the Runs page (this machine until the user picks a cluster)."""
    return st.session_state.get(KEY, Placement())


def placement_caption() -> str:
    where = current_placement()
    return "this machine" if where.backend == "local" else f"the Ray cluster at {where.address}"


def placement_settings() -> None:
    """The Runs page's 'Where jobs run' panel: backend, cluster address, artifacts folder, a connection check."""
    where = current_placement()
    with st.expander(f"Where new jobs run: {plain(placement_caption())}", icon=":material/hub:"):
        backend = st.radio(
            "Backend",
            ["local", "ray"],
            index=["local", "ray"].index(where.backend),
            horizontal=True,
            format_func={"local": "this machine", "ray": "Ray cluster"}.get,
            key="placement-backend",
        )
        if backend == "local":
            st.session_state[KEY] = Placement()
            st.caption(
                "One job at a time per GPU (or one on a CPU-only machine); nothing to install or start."
            )
            return
        address = st.text_input(
            "Cluster address (HOST:PORT, or auto for a cluster started here)",
            where.address or os.environ.get(RAY_ADDRESS_ENV, "auto"),
            key="placement-address",
        )
        artifacts = st.text_input(
            "Artifacts folder every node reaches (empty: the workspace)",
            where.artifacts or "",
            key="placement-artifacts",
        )
        cols = st.columns(3)
        gpus_per_worker = cols[0].number_input(
            "GPUs per training process",
            min_value=0.05,
            max_value=8.0,
            value=float(where.gpus_per_worker),
            step=0.25,
            help="where a job uses the cluster's GPUs; 0.5 puts two processes on one GPU",
            key="placement-gpus",
        )
        accelerator = cols[1].text_input(
            "GPU type (optional)",
            where.accelerator_type or "",
            help="Ray's accelerator_type, e.g. A100 or H100: only nodes with this GPU model",
            key="placement-accelerator",
        )
        custom = cols[2].text_input(
            "Custom resources (optional)",
            ", ".join(f"{k}={v:g}" for k, v in where.custom_resources.items()),
            help="NAME=AMOUNT, comma separated, as given to `ray start --resources`",
            key="placement-resources",
        )
        if st.button("Connect", icon=":material/link:", key="placement-connect"):
            with user_errors("Connecting to the cluster", stop=False):
                requested = custom_resources(custom)
                summary = cluster_summary(address.strip())
                st.session_state[KEY] = Placement(
                    "ray",
                    address.strip(),
                    artifacts.strip() or None,
                    gpus_per_worker,
                    accelerator.strip() or None,
                    requested,
                )
                st.success(
                    plain(
                        f"Connected: {counted(summary['nodes'], 'node')}, {counted(summary['cpus'], 'CPU')}, "
                        f"{counted(summary['gpus'], 'GPU')}. "
                        "New jobs and studies go to this cluster; a study's cells run in parallel there."
                    )
                )
