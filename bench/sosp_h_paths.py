"""SOSP-H's channel-scale path against its parameter path on zoo models: agreement (float64) and time (one thread).

Usage: python bench/sosp_h_paths.py [--models timm:efficientnet_b0,...] [--side 64] [--samples 8]
Each model runs in a fresh process; a row records which producers do not scale with their rows (those models take
the parameter path), the largest difference between the two paths relative to the largest term, and both times.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = (
    "resnet56",
    "vgg19",
    "densenet40",
    "torchvision:resnet18",
    "torchvision:resnet50",
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:convnext_tiny",
    "torchvision:regnet_y_400mf",
    "torchvision:densenet121",
    "torchvision:vgg11_bn",
    "torchvision:mnasnet0_5",
    "torchvision:googlenet",
    "timm:resnext26ts",
    "timm:regnetx_002",
    "timm:efficientnet_b0",
    "timm:mobilenetv3_small_050",
    "timm:convnext_atto",
    "timm:ghostnet_050",
    "timm:densenet121",
    "timm:dla34",
    "timm:dpn48b",
    "timm:rexnet_100",
    "timm:res2net50_14w_8s",
    "timm:skresnet18",
    "timm:seresnet18",
    "timm:cspresnet50",
    "timm:hrnet_w18_small",
    "timm:nf_regnet_b0",
    "timm:mixnet_s",
    "timm:resnest14d",
    "timm:repvgg_a0",
)


def compare(spec: str, side: int, samples: int, queue) -> None:
    import torch

    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench
    from sosp_engine.saliency.common import AnalysisInputs
    from sosp_engine.saliency.homogeneity import not_scaling
    from sosp_engine.saliency.sosp_h import channel_scale_terms, gradient_and_hvp, scalable_producers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    row: dict = {"model": spec, "side": side, "samples": samples, "threads": 1}
    try:
        wb = open_workbench(ModelSetup(spec, f"synthetic:3,{side},{side}:10"))
        model = wb.model.eval().double()
        x = torch.randn(samples, 3, side, side, dtype=torch.float64)
        y = torch.randint(0, 10, (samples,))
        inputs = AnalysisInputs(model, wb.structures, x, y, batch_size=samples)
        row["not_scaling"] = not_scaling(inputs)
        start = time.perf_counter()
        grads, hvp = gradient_and_hvp(inputs, inputs.theta_struc())
        reference = (inputs.per_structure(grads), inputs.per_structure(hvp))
        row["parameter_path_s"] = time.perf_counter() - start
        rows = scalable_producers(inputs)
        if rows is not None:
            start = time.perf_counter()
            terms = channel_scale_terms(inputs, rows)
            row["channel_scale_path_s"] = time.perf_counter() - start
            if terms is None:
                row["error"] = "a producer module never ran"
            else:
                row["first_rel_diff"], row["second_rel_diff"] = [
                    float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
                    for a, b in zip(terms, reference)
                ]
        row["structures"] = wb.structures.num_structures
    except Exception as exc:  # recorded per model; the sweep goes on
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    queue.put(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sosp-h-paths.jsonl"))
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with open(args.out, "a") as out:
        for spec in args.models.split(","):
            queue = ctx.Queue()
            proc = ctx.Process(target=compare, args=(spec, args.side, args.samples, queue))
            proc.start()
            proc.join(900)
            if proc.is_alive():
                proc.kill()
                row = {"model": spec, "error": "timed out after 900 s"}
            else:
                row = (
                    queue.get()
                    if not queue.empty()
                    else {"model": spec, "error": f"exit code {proc.exitcode}"}
                )
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
