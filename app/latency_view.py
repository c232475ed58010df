"""The latency-target section of the Pruning ratios page: time the net pruned along the order, take the mask that
reaches a target latency drop on this machine."""

from __future__ import annotations

import streamlit as st

from app.export import file_slug
from app.guard import user_errors
from app.text import plain
from sosp_engine.saliency.analysis import AnalysisResult
from sosp_engine.devices import resolve_device
from sosp_engine.latency.profile import LATENCY_UNIT, measure_profile
from sosp_engine.nets.loading import Workbench
from sosp_engine.pruning.masks import mask_json, mask_summary


def latency_section(record: dict, result: AnalysisResult, workbench: Workbench) -> None:
    """Measure the analysis's latency profile on a device and batch (with a progress bar), then slice it at a target."""
    st.subheader("Prune to a latency target")
    st.caption(
        "Latency is far from proportional to MACs (odd widths, small layers). The net pruned along this "
        "analysis's order is timed at a dozen points, alternately with the unpruned net, on this machine; the "
        "mask is the shortest prefix whose interpolated latency reaches the target."
    )
    cols = st.columns(4)
    device = cols[0].selectbox("Timing device", ["auto", "cpu", "cuda"], key="lat-device")
    batch = cols[1].number_input("Timed batch size", 1, 4096, 1, key="lat-batch")
    points = cols[2].number_input("Timed points", 3, 41, 12, key="lat-points")
    target = cols[3].slider("Latency drop", 0.0, 0.95, 0.3, 0.05, format="%.2f", key="lat-target")
    key = ("latency-profile", record["id"], device, int(batch), int(points))
    if st.button("Measure the latency profile", icon=":material/timer:", key="lat-run"):
        bar = st.progress(0.0, text="starting ...")
        with user_errors("Measuring the latency", stop=False):
            st.session_state[key] = measure_profile(
                workbench.model,
                workbench.structures,
                result.ordered_keys(),
                result.n_prunable,
                workbench.example,
                resolve_device(device),
                int(batch),
                int(points),
                repeats=10,
                stops=result.stops(workbench.structures),
                progress=lambda f, m: bar.progress(f, text=plain(m)),
            )
        bar.empty()
    profile = st.session_state.get(key)
    if profile is None:
        return
    with user_errors("Slicing at the latency target"):
        mask = result.mask(workbench.structures, target, LATENCY_UNIT, profile)
    summary = mask_summary(workbench.structures, mask)
    predicted = float(profile.predict(len(mask)))
    st.success(
        plain(
            f"On {profile.device} at batch {profile.batch} ({profile.threads} threads) the unpruned net takes "
            f"{1000 * profile.reference_seconds:.2f} ms. Pruning {len(mask)} structures is predicted to take "
            f"{1 - predicted:.1%} less ({1000 * predicted * profile.reference_seconds:.2f} ms), removing "
            f"{summary['param_ratio']:.1%} of the parameters and {summary['mac_ratio']:.1%} of the MACs."
        )
    )
    st.download_button(
        "Mask at this latency (JSON)",
        mask_json(workbench.structures, mask, method=result.config.method, ratio=target, unit=LATENCY_UNIT),
        file_slug(f"mask {record['name']} {target:.0%} latency") + ".json",
        "application/json",
        icon=":material/download:",
        key="lat-mask",
    )
