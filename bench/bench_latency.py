"""Does a pruned net run as fast as its MACs say? Latency of physically pruned nets with and without --round-to.

    python bench/bench_latency.py [--model resnet56] [--data synthetic:3,32,32:10] [--samples 128] [--ratios 0.5,0.8]
                                  [--round-to 8] [--batches 1,64] [--threads 1] [--device cpu|cuda]
                                  [--normalize none,macs,latency]

One process, `--threads` torch threads (recorded). Per ratio: the MAC drop of the mask and the measured latency drop
(medians of forwards timed alternately with the unpruned net) at each batch size, for the SOSP-H order under each
normalisation, plain and rounded to multiples of `--round-to`; the ratio latency drop / MAC drop says how much of the
saved compute turns into saved time, and the predicted loss increase what the saved time costs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet56")
    parser.add_argument(
        "--data", default="synthetic:3,32,32:10", help="data spec; its shape is the timed input's"
    )
    parser.add_argument("--samples", type=int, default=128, help="analysis samples for the SOSP-H order")
    parser.add_argument("--ratios", default="0.5,0.8")
    parser.add_argument(
        "--round-to", type=int, default=8, help="the rounded orders' multiple (1: unrounded only)"
    )
    parser.add_argument(
        "--normalize",
        default="none",
        help="comma-separated normalisations of the order (none, macs, latency: timed at each batch)",
    )
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed forwards per net and batch (default: 30 at batch <= 16, else 10)",
    )
    parser.add_argument("--device", default="cpu", help="where the nets are timed (and the order computed)")
    parser.add_argument(
        "--targets",
        default="",
        help="latency reductions (e.g. 0.2,0.3): per order and batch, the mask that a latency profile "
        "picks for each, with its predicted loss increase and measured drop",
    )
    parser.add_argument("--out", default="bench/results/latency.jsonl")
    args = parser.parse_args()

    import torch

    from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis
    from sosp_engine.errors import AnalysisError
    from sosp_engine.latency.profile import LatencyTiming, measure_profile, refine_profile, relative_latency
    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench
    from sosp_engine.pruning.masks import mask_summary, pruned_copy

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wb = open_workbench(ModelSetup(args.model, args.data))
    batches = [int(b) for b in args.batches.split(",")]

    def repeats(batch: int) -> int:
        return args.repeats or (10 if batch > 16 else 30)

    rows = []
    for normalize in args.normalize.split(","):
        for round_to in sorted({1, args.round_to}):
            # a latency-normalised order is made for one batch size: one analysis per timed batch
            for timed in [[b] for b in batches] if normalize == "latency" else [batches]:
                result = run_analysis(
                    wb,
                    AnalysisConfig(
                        method="sosp-h",
                        samples=args.samples,
                        batch_size=args.samples,
                        round_to=round_to,
                        normalize=normalize,
                        latency_device=args.device,
                        latency_batch=timed[0],
                        setup=ModelSetup(device=args.device),
                    ),
                )
                for ratio in (float(r) for r in args.ratios.split(",")):
                    try:
                        mask = result.mask(wb.structures, ratio)
                    except (
                        AnalysisError
                    ) as exc:  # e.g. rounding keeps whole stages: the ratio cannot be reached
                        print(
                            json.dumps({"round_to": round_to, "ratio": ratio, "error": str(exc)}), flush=True
                        )
                        continue
                    summary = mask_summary(wb.structures, mask)
                    smaller = pruned_copy(wb.model, wb.structures, mask, wb.example)
                    for b in timed:
                        # Alternately with the unpruned net, forward by forward: a change of load hits both alike.
                        timing = LatencyTiming(args.device, b, repeats=repeats(b), warmup=3)
                        seconds, relative = relative_latency(smaller, wb.model, wb.example, timing)
                        row = {
                            "model": args.model,
                            "data": args.data,
                            "device": args.device,
                            "normalize": normalize,
                            "round_to": round_to,
                            "ratio": ratio,
                            "batch": b,
                            "threads": args.threads,
                            "mac_drop": summary["mac_ratio"],
                            "latency_drop": 1 - relative,
                            "latency_ms": 1000 * seconds,
                            "base_ms": 1000 * seconds / relative,
                            "predicted_increase": result.predicted_increase(len(mask)),
                            "layer_latency_s": result.timings.get("layer_latency"),
                        }
                        row["efficiency"] = row["latency_drop"] / row["mac_drop"]
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                for b in timed if args.targets else []:
                    order = result.order(wb.structures)
                    profile = measure_profile(wb, order, LatencyTiming(args.device, b, repeats=repeats(b)))
                    for target in (float(t) for t in args.targets.split(",")):
                        try:
                            line_mask = result.mask(
                                wb.structures, target, "latency", profile
                            )  # from the line alone
                            refine_profile(profile, wb, order, target, repeats=repeats(b))
                            mask = result.mask(wb.structures, target, "latency", profile)
                        except AnalysisError as exc:
                            print(
                                json.dumps({"normalize": normalize, "target": target, "error": str(exc)}),
                                flush=True,
                            )
                            continue
                        drops = []
                        for chosen in (line_mask, mask):
                            smaller = pruned_copy(wb.model, wb.structures, chosen, wb.example)
                            drops.append(
                                1
                                - relative_latency(
                                    smaller,
                                    wb.model,
                                    wb.example,
                                    LatencyTiming(args.device, b, repeats=repeats(b)),
                                )[1]
                            )
                        row = {
                            "model": args.model,
                            "data": args.data,
                            "device": args.device,
                            "normalize": normalize,
                            "round_to": round_to,
                            "target": target,
                            "batch": b,
                            "threads": args.threads,
                            "structures": len(mask),
                            "mac_drop": mask_summary(wb.structures, mask)["mac_ratio"],
                            "latency_drop": drops[1],
                            "predicted_increase": result.predicted_increase(len(mask)),
                            "line_structures": len(line_mask),
                            "line_latency_drop": drops[0],
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
