"""Render bench/results.jsonl as the markdown tables of docs/benchmarks.md (printed to stdout)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str = "bench/results.jsonl") -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    print("| model | N' | S | task | seconds | x forward+backward | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["task"] == "greedy":
            continue
        ratio = r.get("ratio_to_forward_backward")
        extra = f" (selection {r['selection_s']:.2f} s)" if "selection_s" in r else ""
        print(f"| {r['model']} | {r['samples']} | {r['structures']} | {r['task']}{extra} | {r['seconds']:.1f} | "
              f"{ratio:.2f} | {r['peak_rss_mb']:.0f} |" if ratio == ratio and ratio is not None else
              f"| {r['model']} | {r['samples']} | - | {r['task']} | failed: {r.get('error')} | - | - |")
    for r in rows:
        if r["task"] == "greedy":
            print(f"\nGreedy selection (eq. 4) on {r['model']}, S = {r['structures']}: O(S^2) incremental "
                  f"{r['fast_s']:.3f} s, literal O(S^3) {r['literal_s']:.1f} s: **{r['speedup']:.0f}x** faster.")


if __name__ == "__main__":
    main(*sys.argv[1:])
