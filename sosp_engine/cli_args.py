"""Flags shared by several commands (cli.py and cli_studies.py), defined once."""
from __future__ import annotations

import argparse


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """--nproc and --sync-bn: one training across several processes."""
    p.add_argument("--nproc", type=int, default=1,
                   help="train across N processes with DistributedDataParallel (one per GPU; gloo on CPU), same global batch")
    p.add_argument("--sync-bn", action="store_true",
                   help="with --nproc: BatchNorm statistics over the global batch (CUDA only; default: per process)")
