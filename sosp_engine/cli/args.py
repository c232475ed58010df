"""Flags and their readers shared by several verb groups (main, jobs, studies), defined once."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import SospError
from ..experiments.procedures import ExperimentConfig
from ..experiments.training import TrainConfig
from ..latency.profile import LATENCY_UNIT
from ..runs.jobs import BACKENDS, RAY_ADDRESS_ENV, Placement, custom_resources
from ..runs.store import Store
from ..nets.setup import ModelSetup
from ..saliency.analysis import AnalysisOptions
from ..saliency.selection import UNITS
from ..experiments.front_ends import not_offered
from ..options import Option, options_of


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
    """The `ModelSetup` of a verb, a flag per declared field (--model required); `weights_help`: the verb's own
    words for --weights."""
    for option in options_of(ModelSetup):
        kwargs = _flag_kwargs(option) | {"dest": _setup_dest(option)}
        if option.name == "model_spec":
            kwargs |= {"required": True, "default": None, "help": option.help}
        if option.name == "weights" and weights_help:
            kwargs["help"] = weights_help
        p.add_argument(*option.flags, **kwargs)
    if json_out:
        p.add_argument("--out", default=None, help="write the JSON result here instead of stdout")


def _setup_dest(option: Option) -> str:
    return option.flags[0][2:].replace("-", "_")  # args.model, args.data: what the verbs read


def setup_from(args: argparse.Namespace) -> ModelSetup:
    """The ModelSetup the flags of `add_model_args` give."""
    return ModelSetup(
        **{option.name: getattr(args, _setup_dest(option)) for option in options_of(ModelSetup)}
    )


TRAINING_DEST = "train_"  # training flags land as train_* so they never mix with the analysis options


def add_option_flags(
    p: argparse.ArgumentParser,
    cls: type,
    verb: str,
    dest_prefix: str = "",
    clash_prefix: str = "",
    defaults: dict[str, object] | None = None,
) -> None:
    """One flag per declared option of `cls` (help, range, choices and default from its declaration), but those
    NOT_OFFERED lists for `verb`, which the verb's --help names with their reasons. A flag another part of the verb
    already has gets `clash_prefix` (`--analysis-seed` beside the training's `--seed`)."""
    skipped = not_offered(cls, verb)
    for option in options_of(cls):
        if option.name in skipped:
            continue
        option = dataclasses.replace(option, default=(defaults or {}).get(option.name, option.default))
        kwargs = _flag_kwargs(option) | {"dest": dest_prefix + option.name}
        try:
            p.add_argument(*option.flags, **kwargs)
        except argparse.ArgumentError:
            p.add_argument(*(f"--{clash_prefix}{flag[2:]}" for flag in option.flags), **kwargs)
    if skipped:
        listed = "; ".join(f"{cls.__name__}.{name}: {why}" for name, why in skipped.items())
        p.epilog = f"{p.epilog[:-1] + '; ' if p.epilog else 'Not offered here: '}{listed}."


def _flag_kwargs(option: Option) -> dict:
    """What argparse needs for one option's flag."""
    kwargs: dict = {"default": option.default, "help": option.described().replace("%", "%%")}
    if option.kind is bool:
        return kwargs | {"action": argparse.BooleanOptionalAction if option.default else "store_true"}
    if option.kind is tuple:
        return kwargs | {"nargs": "*", "type": option.item}
    if option.choices:
        return kwargs | {"choices": option.choices}

    def parse(text: str) -> object:
        try:
            return option.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = option.kind.__name__  # argparse names the kind in its own errors
    return kwargs | {"type": parse}


def options_from(args: argparse.Namespace, cls: type, dest_prefix: str = "", **given: object):
    """The config of class `cls` the verb's flags give: every option it has a flag for, `given` and the defaults
    for the rest."""
    values = {}
    for option in options_of(cls):
        if hasattr(args, dest_prefix + option.name):
            value = getattr(args, dest_prefix + option.name)
            values[option.name] = tuple(value) if option.kind is tuple else value
    return cls(**{**values, **given})


def add_analysis_args(p: argparse.ArgumentParser, verb: str, **defaults: object) -> None:
    """The options of the analyses a verb runs (`AnalysisOptions`), from their declarations (`defaults`: the
    verb's own)."""
    add_option_flags(p, AnalysisOptions, verb, clash_prefix="analysis-", defaults=defaults)


def analysis_options_from(args: argparse.Namespace) -> AnalysisOptions:
    return options_from(args, AnalysisOptions)


def add_workspace_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workspace", default=None, help="workspace folder (default $SOSP_WORKSPACE or ./workspace)"
    )


def add_training_args(p: argparse.ArgumentParser, verb: str, epochs: int = 200) -> None:
    """The training schedule (`TrainConfig`), from its declarations; its flags land as train_*."""
    add_option_flags(p, TrainConfig, verb, dest_prefix=TRAINING_DEST, defaults={"epochs": epochs})


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig given by the flags of `add_training_args` (on the setup's device)."""
    return options_from(args, TrainConfig, TRAINING_DEST, device=args.device)


def add_experiment_args(p: argparse.ArgumentParser, verb: str) -> None:
    add_training_args(p, verb)
    p.add_argument("--finetune-epochs", type=int, default=None, help="default: repeat the training schedule")
    add_analysis_args(p, verb)
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
