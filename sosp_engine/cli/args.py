"""Flags shared by several commands (cli.py and cli_studies.py), defined once."""
from __future__ import annotations

import argparse

from ..errors import SospError
from ..runs.jobs import BACKENDS, RAY_ADDRESS_ENV, Placement


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """--nproc and --sync-bn: one training across several processes."""
    p.add_argument("--nproc", type=int, default=1,
                   help="train across N processes with DistributedDataParallel (one per GPU; gloo on CPU), same global batch")
    p.add_argument("--sync-bn", action="store_true",
                   help="with --nproc: BatchNorm statistics over the global batch (CUDA only; default: per process)")


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """--backend, --ray-address, --artifacts: where a background job runs and writes its run folder."""
    p.add_argument("--backend", default="local", choices=BACKENDS,
                   help="local: a process on this machine (default); ray: a task on a Ray cluster")
    p.add_argument("--ray-address", default=None,
                   help=f"with --backend ray: the cluster's HOST:PORT (default ${RAY_ADDRESS_ENV}; 'auto': the cluster "
                        "started on this machine with `ray start --head`)")
    p.add_argument("--artifacts", default=None,
                   help="put the job's run folder (checkpoints, masks, state) under this folder, one every node "
                        "reaches (default: the workspace)")


def placement_from(args: argparse.Namespace) -> Placement:
    """The Placement the flags of `add_backend_args` give."""
    return Placement(args.backend, args.ray_address, args.artifacts)


def parse_widen(items: list[str]) -> dict[str, float]:
    """['stage 1 (32x32)=2'] -> {'stage 1 (32x32)': 2.0}; anything else is a clear error."""
    factors = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        try:
            factors[key] = float(value)
        except ValueError:
            raise SospError(f"--widen takes NAME=FACTOR, got '{item}'") from None
        if not sep or not key:
            raise SospError(f"--widen takes NAME=FACTOR, got '{item}'")
    return factors
