"""The memory probe against a real batch: the estimate at batch B next to the tensor peak measured at B.

python bench/bench_memory.py --models resnet56,vgg19 --methods sosp-h,sosp-i --batch 64 --out bench/results/memory.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sosp_engine.saliency.analysis import AnalysisOptions, compute_saliency  # noqa: E402
from sosp_engine.nets.setup import ModelSetup  # noqa: E402
from sosp_engine.pruning.workbench import open_workbench  # noqa: E402
from sosp_engine.saliency.memory import PeakTensorBytes, probe  # noqa: E402
from sosp_engine.saliency.common import AnalysisInputs  # noqa: E402

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet56,vgg19")
    parser.add_argument("--methods", default="sosp-h,sosp-i")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="append one JSON line per row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.models.split(","):
        wb = open_workbench(ModelSetup(spec, "synthetic:3,32,32:10"))
        model = wb.model.eval()
        x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        y = torch.arange(args.batch) % 10
        for method in args.methods.split(","):

            def run(n: int) -> None:
                compute_saliency(
                    AnalysisInputs(model, wb.structures, x[:n], y[:n], "cross-entropy", n),
                    AnalysisOptions(method=method),
                    "none",
                )

            estimate = probe(run, CPU, largest=args.batch)
            with PeakTensorBytes() as tracker:
                run(args.batch)
            row = {
                "model": spec,
                "method": method,
                "batch": args.batch,
                "threads": args.threads,
                "estimate_mib": round(estimate.peak(args.batch) / 2**20),
                "measured_mib": round(tracker.peak["cpu"] / 2**20),
                "per_sample_mib": round(estimate.per_sample / 2**20, 2),
                "matrix_mib": round(estimate.floor / 2**20),
                "date": time.strftime("%Y-%m-%d"),
            }
            row["error"] = round(row["estimate_mib"] / row["measured_mib"] - 1, 3)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
