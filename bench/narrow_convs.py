"""Why a pruned CIFAR ResNet saves less time than MACs: one 3x3 convolution at the widths pruning leaves, timed alone in
PyTorch eager and in ONNX Runtime (batch 64, 32x32, one thread), as multiply-accumulates per second.

    python bench/narrow_convs.py [--threads 1] [--no-docs]

Each width pair is timed alternately in both runtimes (medians of 15 after 3 warm-up runs). Writes
bench/results/narrow-convs-DATE.jsonl and the "narrow-convs" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import provenance, provenance_line, publish  # noqa: E402

WIDTHS = [(64, 64), (32, 32), (24, 24), (16, 16), (16, 8), (8, 16), (8, 8), (13, 13)]
BATCH, SIDE, REPEATS, WARMUP = 64, 32, 15, 3


def measure() -> list[dict]:
    import torch

    from sosp_engine.latency.runtimes import RUNTIMES, forward_call

    rows = []
    for cin, cout in WIDTHS:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        x = torch.randn(BATCH, cin, SIDE, SIDE)
        forwards = {r: forward_call(conv, x, r, torch.device("cpu")) for r in RUNTIMES}
        times: dict[str, list[float]] = {r: [] for r in RUNTIMES}
        for i in range(WARMUP + REPEATS):
            for runtime, forward in forwards.items():
                start = time.perf_counter()
                forward()
                if i >= WARMUP:
                    times[runtime].append(time.perf_counter() - start)
        macs = BATCH * SIDE * SIDE * cin * cout * 9
        for runtime, seconds in times.items():
            ms = 1000 * statistics.median(seconds)
            rows.append(
                {"in": cin, "out": cout, "runtime": runtime, "ms": ms, "gmacs_per_s": macs / ms / 1e6}
            )
    return rows


def render(rows: list[dict], run: dict) -> str:
    lines = [
        "## Why narrow layers save less time than MACs (`python bench/narrow_convs.py`)",
        "",
        provenance_line(run),
        "",
        f"One 3x3 convolution, batch {BATCH}, {SIDE}x{SIDE}, timed alone: the widths a pruned CIFAR ResNet keeps.",
        "",
        "| in -> out channels | eager ms | eager GMAC/s | ONNX Runtime ms | ONNX Runtime GMAC/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for cin, cout in WIDTHS:
        e, o = (
            next(r for r in rows if (r["in"], r["out"], r["runtime"]) == (cin, cout, k))
            for k in ("eager", "onnxruntime")
        )
        lines.append(
            f"| {cin} -> {cout} | {e['ms']:.2f} | {e['gmacs_per_s']:.1f} | {o['ms']:.2f} | {o['gmacs_per_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    run = provenance(args.threads, "one process, warm, the two runtimes interleaved", "one convolution alone")
    rows = measure()
    publish("narrow-convs", None if args.no_docs else "narrow-convs", rows, run, render)


if __name__ == "__main__":
    main()
