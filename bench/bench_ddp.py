"""What does one training across processes cost or buy? Epoch time with --nproc N against one process, same cores.

    python bench/bench_ddp.py [--model resnet20] [--data digits] [--epochs 2] [--nproc 2] [--cores 2]

One process with `--cores` torch threads against `--nproc` processes with cores / nproc threads each (recorded), the
same global batch and epochs; the time includes starting the processes (spawn, imports, process group), reported
as a ratio to the single-process run of the same invocation. The parameters' largest difference after training says
whether the two runs followed each other (they do exactly only without BatchNorm or with --sync-bn on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/results/ddp.jsonl")
    args = parser.parse_args()

    import torch

    from sosp_engine.nets.data import load_data
    from sosp_engine.nets import build_model
    from sosp_engine.experiments.trainer import train
    from sosp_engine.experiments.training import TrainConfig

    torch.set_num_threads(args.cores)
    data = load_data(args.data)
    torch.manual_seed(0)
    model = build_model(args.model, data.num_classes, data.input_shape[0])
    times, nets = {}, {}
    for nproc in (1, args.nproc):
        net = copy.deepcopy(model)
        start = time.perf_counter()
        train(net, data, TrainConfig(epochs=args.epochs, batch_size=128, device=args.device, nproc=nproc))
        times[nproc], nets[nproc] = time.perf_counter() - start, net
    drift = max(
        (p - q).abs().max().item() for p, q in zip(nets[1].parameters(), nets[args.nproc].parameters())
    )
    row = {
        "model": args.model,
        "data": args.data,
        "epochs": args.epochs,
        "device": args.device,
        "cores": args.cores,
        "nproc": args.nproc,
        "seconds_one_process": round(times[1], 2),
        "seconds_nproc": round(times[args.nproc], 2),
        "ratio": round(times[args.nproc] / times[1], 2),
        "max_param_difference": drift,
    }
    print(json.dumps(row))
    with open(ROOT / args.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
