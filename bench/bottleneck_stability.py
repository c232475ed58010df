"""Are SOSP's bottlenecks stable? Across the seeds of an expand study's trained plain nets, and across N' (and the draw
of the N' samples) on one trained net. Writes JSON for bench/claims.py.

    python bench/bottleneck_stability.py --workspace WS STUDY_ID --samples 50,100,250,500,1000 --seeds 0,1,2 \
        --out bench/results/bottleneck-stability.json
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

from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis  # noqa: E402
from sosp_engine.nets.setup import config_from_dict  # noqa: E402
from sosp_engine.experiments.bottlenecks import paper_widening, unit_ratios  # noqa: E402
from sosp_engine.experiments.expand_study import PLAIN, ExpandStudyConfig  # noqa: E402
from sosp_engine.runs.study_state import expand_state  # noqa: E402
from sosp_engine.nets.setup import ModelSetup  # noqa: E402
from sosp_engine.pruning.workbench import open_workbench  # noqa: E402
from sosp_engine.pruning.masks import layer_table  # noqa: E402
from sosp_engine.runs.store import Store, run_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_id")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--samples", default="50,100,250,500,1000")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the N' draw on trial 0's trained net")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    job = Store(args.workspace).job(args.study_id)
    config = config_from_dict(ExpandStudyConfig, job["config"])
    across_trials = [
        {"trial": r["trial"], "bottlenecks": r["bottlenecks"]}
        for r in expand_state(job)["runs"]
        if r["procedure"] == PLAIN
    ]
    weights = run_folder(job) / PLAIN / "trial0" / "trained.pt"
    wb = open_workbench(
        ModelSetup(config.model_spec, config.data_spec, str(weights), config.exclude, config.preset)
    )
    across_samples = []
    for samples in [int(s) for s in args.samples.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            start = time.perf_counter()
            result = run_analysis(
                wb,
                AnalysisConfig(
                    method=config.method, samples=samples, seed=seed, setup=ModelSetup(device="cpu")
                ),
            )
            table = layer_table(wb.structures, result.mask(wb.structures, config.ratio, config.unit))
            stages = unit_ratios(table, "stage")
            across_samples.append(
                {
                    "samples": samples,
                    "seed": seed,
                    "bottlenecks": sorted(paper_widening(config.model_spec, table)),
                    "stage_ratios": dict(zip(stages.unit, stages.pruning_ratio.round(4))),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
            print(across_samples[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "study": job["id"],
                "model_spec": config.model_spec,
                "data_spec": config.data_spec,
                "method": config.method,
                "ratio": config.ratio,
                "unit": config.unit,
                "threads": args.threads,
                "across_trials": across_trials,
                "across_samples": across_samples,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
