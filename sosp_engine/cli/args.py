"""Flags and their readers shared by several verb groups (main, jobs, studies), defined once."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import SospError
from ..experiments.procedures import ExperimentConfig
from ..experiments.training import TrainConfig
from ..latency.profile import LATENCY_UNIT
from ..latency.runtimes import EAGER, RUNTIMES
from ..runs.jobs import BACKENDS, RAY_ADDRESS_ENV, Placement, custom_resources
from ..runs.store import Store
from ..nets.setup import ModelSetup
from ..saliency.analysis import AnalysisOptions
from ..saliency.methods import METHODS
from ..saliency.selection import NORMALIZATIONS, UNITS


def add_latency_runtime_arg(p: argparse.ArgumentParser, timed: str) -> None:
    """--latency-runtime: the runtime latency is timed in (`timed` says which latency, for the help)."""
    p.add_argument(
        "--latency-runtime",
        default=EAGER,
        choices=RUNTIMES,
        help=f"the runtime {timed} is timed in: PyTorch eager, or ONNX Runtime (the net exported to ONNX, as "
        "it ships; the CPU provider, or CUDA/TensorRT ones on a GPU where installed)",
    )


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """--nproc and --sync-bn: one training across several processes."""
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train across N processes with DistributedDataParallel (one per GPU; gloo on CPU), same global batch",
    )
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="with --nproc: BatchNorm statistics over the global batch (CUDA only; default: per process)",
    )


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """--backend, --ray-address, --artifacts: where a background job runs and writes its run folder."""
    p.add_argument(
        "--backend",
        default="local",
        choices=BACKENDS,
        help="local: a process on this machine (default); ray: a task on a Ray cluster",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help=f"with --backend ray: the cluster's HOST:PORT (default ${RAY_ADDRESS_ENV}; 'auto': the cluster "
        "started on this machine with `ray start --head`)",
    )
    p.add_argument(
        "--artifacts",
        default=None,
        help="put the job's run folder (checkpoints, masks, state) under this folder, one every node "
        "reaches (default: the workspace)",
    )

    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=1.0,
        help="with --backend ray: GPUs each training process takes where the job uses GPUs (default 1; "
        "0.5 puts two on one GPU)",
    )
    p.add_argument(
        "--accelerator-type",
        default=None,
        help="with --backend ray: run only on nodes with this GPU type (Ray's accelerator_type, e.g. A100, H100)",
    )
    p.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="with --backend ray: a custom resource each worker needs (as given to `ray start --resources`); "
        "repeatable",
    )


def placement_from(args: argparse.Namespace) -> Placement:
    """The Placement the flags of `add_backend_args` give."""
    return Placement(
        args.backend,
        args.ray_address,
        args.artifacts,
        args.gpus_per_worker,
        args.accelerator_type,
        custom_resources(args.resource),
    )


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


def add_model_args(
    p: argparse.ArgumentParser, json_out: bool = True, weights_help: str | None = None
) -> None:
    """--model, --data, --weights, --exclude, --preset, --device: the `ModelSetup` of a verb."""
    p.add_argument(
        "--model",
        required=True,
        help="zoo name (resnet56, resnet32x4, vgg19, densenet40), torchvision:NAME or file.py:factory",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH | synthetic:C,H,W:K",
    )
    p.add_argument(
        "--weights",
        default=None,
        help=weights_help or "checkpoint with a state_dict (loaded with weights_only=True)",
    )
    p.add_argument("--exclude", nargs="*", default=[], help="module name patterns never to prune (fnmatch)")
    p.add_argument(
        "--preset", default="auto", help="exclusion preset: auto, none, cifar-resnet, torchvision-resnet"
    )
    p.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda, cuda:N")
    if json_out:
        p.add_argument("--out", default=None, help="write the JSON result here instead of stdout")


def setup_from(args: argparse.Namespace) -> ModelSetup:
    """The ModelSetup the flags of `add_model_args` give."""
    return ModelSetup(args.model, args.data, args.weights, list(args.exclude), args.preset, args.device)


def add_analysis_args(
    p: argparse.ArgumentParser, samples: int = 1000, timed: str = "the latency unit", method: bool = True
) -> None:
    """The options of the analyses a verb runs (`AnalysisOptions`): method (unless the verb picks methods itself),
    N', layer limits, normalisation."""
    if method:
        p.add_argument("--method", default="sosp-h", choices=METHODS)
    p.add_argument(
        "--samples", type=int, default=samples, help="N': analysis samples drawn from the training split"
    )
    p.add_argument("--cap", type=float, default=0.95, help="at most this fraction of a layer is pruned")
    p.add_argument(
        "--min-channels",
        type=int,
        default=1,
        help="keep at least this many structures (channels) of every layer, whatever the ratio",
    )
    p.add_argument(
        "--normalize",
        default="none",
        choices=NORMALIZATIONS,
        help="rank structures by saliency per unit of cost: kernel size (SOSP*), MACs, or latency (each "
        "layer timed alone; the order then depends on timings)",
    )
    add_latency_runtime_arg(p, timed)


def analysis_options_from(args: argparse.Namespace) -> AnalysisOptions:
    """The AnalysisOptions the verb's flags give: every option it has a flag for, the defaults for the rest."""
    names = [f.name for f in dataclasses.fields(AnalysisOptions)]
    return AnalysisOptions(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def add_workspace_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workspace", default=None, help="workspace folder (default $SOSP_WORKSPACE or ./workspace)"
    )


def add_training_args(p: argparse.ArgumentParser, epochs: int = 200, seed: bool = True) -> None:
    """The training schedule (`TrainConfig`); its flags land as train_* so they never mix with analysis options."""
    p.add_argument("--epochs", dest="train_epochs", type=int, default=epochs)
    p.add_argument("--lr", dest="train_lr", type=float, default=0.1)
    p.add_argument("--batch-size", dest="train_batch_size", type=int, default=128)
    p.add_argument("--schedule", dest="train_schedule", default="step", choices=["step", "cosine"])
    if seed:
        p.add_argument("--seed", dest="train_seed", type=int, default=0)
    add_distributed_args(p)


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig given by the flags of `add_training_args` (on the setup's device)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {name: getattr(args, f"train_{name}") for name in names if hasattr(args, f"train_{name}")}
    return TrainConfig(**given, nproc=args.nproc, sync_bn=args.sync_bn, device=args.device)


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    add_training_args(p)
    p.add_argument("--finetune-epochs", type=int, default=None, help="default: repeat the training schedule")
    add_analysis_args(p)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument(
        "--unit",
        default="structures",
        choices=UNITS + (LATENCY_UNIT,),
        help="what --ratio is a fraction of; latency: the CPU latency at batch 1, timed along the order",
    )
    p.add_argument(
        "--target-params", type=int, default=None, help="prune to this many parameters instead of --ratio"
    )
    p.add_argument(
        "--widen",
        nargs="*",
        default=[],
        help="expand-prune: LAYER_OR_STAGE=FACTOR ... (default: the flagged bottlenecks x2)",
    )
    p.add_argument("--widen-factor", type=float, default=None, help="widen-prune: one factor for every layer")
    p.add_argument(
        "--match-widen",
        nargs="*",
        default=[],
        help="widen-prune: LAYER_OR_STAGE=FACTOR ... of the expansion whose parameter count the one factor "
        "matches (with widen-prune, --widen means the same)",
    )
    p.add_argument("--label", default="")


def experiment_config(args: argparse.Namespace, procedure: str) -> ExperimentConfig:
    widen, match = parse_widen(args.widen), parse_widen(args.match_widen)
    if procedure == "widen-prune" and args.widen_factor is None and widen and not match:
        widen, match = {}, widen  # widen-prune sizes itself to the expansion it is compared with
    return ExperimentConfig(
        procedure=procedure,
        setup=setup_from(args),
        training=train_config_from(args),
        analysis=analysis_options_from(args),
        finetune_epochs=args.finetune_epochs,
        ratio=args.ratio,
        unit=args.unit,
        target_params=args.target_params,
        widen=widen,
        match_widen=match,
        widen_factor=args.widen_factor,
        label=args.label,
    )


def open_store(args: argparse.Namespace) -> Store:
    return Store(args.workspace)


def parse_numbers(kind: type, text: str, what: str) -> list:
    """'0.3, 0.5' -> [0.3, 0.5] (or ints); anything else is a clear error naming the field."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SospError(f"{what} must be comma-separated numbers, got '{text}'") from None


def add_code_consent_arg(p: argparse.ArgumentParser, whose: str) -> None:
    """--run-code: the user confirms that the stored model spec of `whose` may import and run its code."""
    p.add_argument(
        "--run-code",
        "--trust-code",  # the flag's earlier name, still accepted
        dest="run_code",
        action="store_true",
        help=f"confirm that {whose}'s model spec may import and run its user code",
    )


def distinct_outputs(outputs: dict[str, str | None]) -> None:
    """Refuse two paths of one command that are one file (an output would silently replace the other output, or the
    mask it was made from)."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if not path:
            continue
        where = Path(path).expanduser().resolve()
        if where in seen:
            raise SospError(
                f"{seen[where]} and {flag} both name '{path}': give each output a file of its own"
            )
        seen[where] = flag
