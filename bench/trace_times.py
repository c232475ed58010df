"""Time the engine's channel trace alone (from scratch, one thread) on matrix models, and write it into their rows.

    python bench/trace_times.py torchvision:swin_t timm:deit_tiny_patch16_224

Each model is built as the matrix builds it (random init, the row's input side); the trace cache is emptied first, so
the figure is `torch.export` plus the label pass plus the measured checks, as a first `find_structures` costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "model_matrix.jsonl"


def trace_seconds(spec: str, side: int) -> float:
    """Seconds of one `find_structures` call from an empty trace cache."""
    import torch

    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.channel_trace import forget_traces
    from sosp_engine.pruning.offered import find_structures
    from sosp_engine.pruning.workbench import open_workbench

    torch.manual_seed(0)
    workbench = open_workbench(ModelSetup(spec, f"synthetic:3,{side},{side}:10"))
    workbench.model.eval()
    forget_traces()
    start = time.perf_counter()
    find_structures(workbench.model, workbench.example)
    return round(time.perf_counter() - start, 2)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("specs", nargs="+", help="matrix model specs that already have a row")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {r["model"]: r for r in map(json.loads, args.results.read_text().splitlines())}
    for spec in args.specs:
        row = rows[spec]
        row["trace_s"] = trace_seconds(spec, row.get("input", 64))
        print(f"{spec}: trace {row['trace_s']} s (input {row.get('input', 64)})", flush=True)
        with args.results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
