"""Render bench/results.jsonl as the markdown tables of docs/benchmarks.md (printed to stdout).

    python bench/report.py [RESULTS.jsonl] [--chart docs/runtime-vs-width.png]

With --chart, also draw the paper's Fig. 2 analogue: seconds per analysis sample of SOSP-H, SOSP-I and one
forward+backward over the width multiplier of ResNet-56 (x1, x2, x4), from the rows of that file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _setting(row: dict) -> tuple:
    return row["model"], row["samples"], row.get("input"), row.get("batch_size"), row.get("threads")


def mean_seconds(rows: list[dict], task: str) -> dict[tuple, float]:
    """Mean seconds of `task`'s rows of each model and setting. A run measures forward+backward first and last, and
    each ratio is to both (the machine's load can drift between them)."""
    times: dict[tuple, list[float]] = {}
    for r in rows:
        seconds = r.get("seconds")
        if r["task"] == task and seconds is not None and seconds == seconds:  # a failed task has none or nan
            times.setdefault(_setting(r), []).append(seconds)
    return {key: sum(ts) / len(ts) for key, ts in times.items()}


def main(path: str = "bench/results.jsonl") -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    baselines = mean_seconds(rows, "forward+backward")
    print("| model | N' | S | task | seconds | x forward+backward | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["task"] == "greedy":
            continue
        base = baselines.get(_setting(r))
        ratio = r["seconds"] / base if base and "seconds" in r else r.get("ratio_to_forward_backward")
        extra = f" (selection {r['selection_s']:.2f} s)" if "selection_s" in r else ""
        print(
            f"| {r['model']} | {r['samples']} | {r['structures']} | {r['task']}{extra} | {r['seconds']:.1f} | "
            f"{ratio:.2f} | {r['peak_rss_mb']:.0f} |"
            if ratio == ratio and ratio is not None
            else f"| {r['model']} | {r['samples']} | - | {r['task']} | failed: {r.get('error')} | - | - |"
        )
    for r in rows:
        if r["task"] == "greedy":
            print(
                f"\nGreedy selection (eq. 4) on {r['model']}, S = {r['structures']}: O(S^2) incremental "
                f"{r['fast_s']:.3f} s, literal O(S^3) {r['literal_s']:.1f} s: **{r['speedup']:.0f}x** faster."
            )


def width_chart(path: str, out: str) -> None:
    """Seconds per sample against the width multiplier of resnet56 (resnet56, resnet56x2, resnet56x4), one line a task."""
    import plotly.graph_objects as go

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    widths = {"resnet56": 1, "resnet56x2": 2, "resnet56x4": 4}
    fig = go.Figure()
    for task, label in (
        ("forward+backward", "one forward+backward"),
        ("sosp-h", "SOSP-H"),
        ("sosp-i", "SOSP-I"),
    ):
        points = sorted(
            (widths[setting[0]], 1000 * seconds / setting[1])
            for setting, seconds in mean_seconds(rows, task).items()
            if setting[0] in widths
        )
        if points:
            fig.add_scatter(
                x=[w for w, _ in points],
                y=[t for _, t in points],
                mode="lines+markers+text",
                name=label,
                text=[f"{t:.1f}" for _, t in points],
                textposition="top left",
            )
    threads = ", ".join(str(t) for t in sorted({r.get("threads") or 0 for r in rows if r["model"] in widths}))
    fig.update_layout(
        title=f"Runtime over network width (ResNet-56, CPU, threads: {threads})",
        width=760,
        height=480,
        xaxis=dict(title="width multiplier", type="log", tickvals=[1, 2, 4], ticktext=["x1", "x2", "x4"]),
        yaxis=dict(title="milliseconds per analysis sample", type="log"),
        legend=dict(x=1.02, y=1),
    )
    fig.write_image(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    chart = None
    if "--chart" in args:
        i = args.index("--chart")
        chart = args[i + 1]
        del args[i : i + 2]
    main(*args)
    if chart:
        width_chart(args[0] if args else "bench/results.jsonl", chart)
