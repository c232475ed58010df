"""`python -m sosp_engine`: the command-line face of the engine; progress on stderr, results as JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


from ..shown import terminal_streams, write_safe_csv
from ..saliency.analysis import AnalysisConfig, AnalysisResult, run_analysis
from ..experiments.bottlenecks import LEVELS, RULES, explain, find_bottlenecks
from ..experiments.procedures import Experiment
from ..runs.records import require_code_consent, store_analysis
from ..atomic import save_atomically
from ..experiments.trainer import train
from ..pruning.counting import count_params
from ..devices import set_threads
from ..latency.profile import (
    LATENCY_UNIT,
    PROFILE_NAME,
    LatencyProfile,
    LatencyTiming,
    compare_latency,
    mask_at_target,
)
from ..nets.data import load_data
from ..nets.onnx_export import save_onnx
from ..errors import SospError, one_line_error
from ..pruning.exactness import exactness_line
from ..pruning.workbench import open_workbench
from ..pruning.pruned_models import save_pruned
from ..pruning.masks import layer_table, load_mask, mask_meta, mask_summary, save_mask
from ..saliency.selection import UNITS
from ..nets import USER_CODE_WARNING, is_user_code
from ..atomic import write_bytes_atomically
from ..experiments.expand_study import plain_net_widening
from ..nets.onnx_export import CHECK_SAMPLES
from ..pruning.export import export_pruned
from ..pruning.workbench import Workbench
from .args import (
    add_code_consent_arg,
    add_analysis_args,
    analysis_options_from,
    setup_from,
    add_experiment_args,
    add_model_args,
    add_training_args,
    add_workspace_arg,
    distinct_outputs,
    experiment_config,
    open_store,
    train_config_from,
)
from .jobs import add_jobs_parser
from .output import ProgressLine, emit, progress_line
from .deployment import add_deployment_parser
from .sensitivity import add_sensitivity_parser
from .studies import add_study_parser


def workbench_from(args: argparse.Namespace) -> Workbench:
    setup = setup_from(args)
    if is_user_code(setup.model_spec):
        progress_line(f"warning: {USER_CODE_WARNING}")
    progress_line(f"loading {setup.model_spec} on {setup.data_spec} ...")
    return open_workbench(setup)


def cmd_info(args: argparse.Namespace) -> dict:
    wb = workbench_from(args)
    summary = mask_summary(wb.structures)
    return {
        "model": args.model,
        "data": args.data,
        "num_classes": wb.data.num_classes,
        "input_shape": list(wb.data.input_shape),
        **({"data_note": wb.data.note} if wb.data.note else {}),
        "layers": len(wb.structures.layers),
        "structures": summary["structures"],
        "params": summary["params_before"],
        "macs": summary["macs_before"],
        "excluded_modules": wb.structures.excluded,
        "unprunable_layers": wb.structures.unprunable,
        "channels": wb.structures.channel_account(),
        "pruned_checkpoint": wb.recipe is not None,
        "layer_table": layer_table(wb.structures).to_dict(orient="records"),
        **onnx_written(args, wb.model, wb),
    }


def onnx_written(args: argparse.Namespace, model, wb) -> dict:
    """--onnx PATH: the model exported to ONNX, checked against PyTorch on real samples ({} without the flag)."""
    if not args.onnx:
        return {}
    distinct_outputs({"--out": getattr(args, "out", None), "--onnx": args.onnx})
    x, _ = wb.data.analysis_samples(CHECK_SAMPLES)  # clamped to the data
    deviation = save_onnx(args.onnx, model, wb.example, x)
    progress_line(
        f"wrote {args.onnx}: ONNX Runtime's output deviates from PyTorch's by {deviation:.1e} at most, on "
        f"{len(x)} real samples and on varied inputs"
    )
    return {"onnx": args.onnx, "onnx_deviation": deviation}


def cmd_prune(args: argparse.Namespace) -> dict:
    distinct_outputs({"--mask": args.mask, "--save": args.save, "--onnx": args.onnx})
    wb = workbench_from(args)
    mask = load_mask(args.mask, wb.structures)
    progress_line(f"pruning {len(mask)} structures physically ...")
    export = export_pruned(wb, mask, onnx=bool(args.onnx))
    if args.onnx and export.onnx is None:  # checked before anything is written: no half of the outputs
        raise SospError(f"nothing was written; {export.onnx_line}")
    export.save(args.save)
    progress_line(exactness_line(export.exactness))
    progress_line(f"reopen it with: --model {args.model} --weights {args.save}")
    written = {}
    if args.onnx:
        write_bytes_atomically(args.onnx, export.onnx)
        progress_line(f"wrote {args.onnx}: {export.onnx_line}")
        written = {"onnx": args.onnx, "onnx_deviation": export.onnx_deviation}
    return {
        **export.summary,
        **export.counted(wb),
        "exactness": export.exactness,
        "saved": args.save,
        **written,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sosp_engine", description="SOSP Lab engine")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: $SOSP_THREADS, else torch's default); jobs inherit it",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_info_and_prune_parsers(sub)
    add_analyze_parsers(sub)
    add_foreground_training_parsers(sub)
    add_bottlenecks_parsers(sub)
    add_sensitivity_parser(sub)
    add_deployment_parser(sub)
    add_study_parser(sub)
    add_jobs_parser(sub)
    return parser


def add_info_and_prune_parsers(sub: argparse._SubParsersAction) -> None:
    """`info` and `prune`: a model summary, and a mask made physical."""
    p = sub.add_parser("info", help="model summary: prunable layers, structures, parameters, MACs")
    add_model_args(p)
    p.add_argument(
        "--onnx", default=None, help="also export the model to ONNX here (checked against PyTorch)"
    )
    p.set_defaults(func=cmd_info)
    p = sub.add_parser(
        "prune", help="apply a mask JSON physically and save the smaller model (reopens with --weights)"
    )
    add_model_args(p)
    p.add_argument("--mask", required=True, help="mask JSON (from analyze or the dashboard)")
    p.add_argument("--save", required=True, help="where to write the pruned model's state_dict")
    p.add_argument(
        "--onnx", default=None, help="also export the pruned model to ONNX here (checked against PyTorch)"
    )
    p.set_defaults(func=cmd_prune)


def add_analyze_parsers(sub: argparse._SubParsersAction) -> None:
    """`analyze`: a method's saliencies and order, the mask at a ratio, the per-stage timings."""
    p = sub.add_parser(
        "analyze", help="compute a method's saliencies and pruning order; write the result and a mask"
    )
    add_model_args(p, json_out=False)
    add_analysis_args(p, "analyze", memory_budget_gb="auto")  # fits its batch to the free memory unless told
    p.add_argument("--ratio", type=float, default=0.5, help="target pruning ratio of the written mask")
    p.add_argument(
        "--unit",
        default="structures",
        choices=UNITS + (LATENCY_UNIT,),
        help="what --ratio is a fraction of; latency: measured along the order on --latency-device",
    )
    p.add_argument(
        "--latency-points",
        type=int,
        default=12,
        help="with --unit latency: pruned nets timed along the order (interpolated between)",
    )
    p.add_argument("--download", action="store_true", help="download CIFAR into the data path first")
    p.add_argument(
        "--out",
        dest="out_dir",
        required=True,
        help="folder for analysis.json, tensors.pt, mask.json, layers.csv",
    )
    p.add_argument(
        "--name",
        default=None,
        help="also record the analysis in the workspace under this name (for the dashboard)",
    )
    p.add_argument(
        "--profile-stages",
        action="store_true",
        help="print the seconds of every stage of the call (loading, tracing, samples, saliency, ...) on stderr",
    )
    add_workspace_arg(p)
    p.set_defaults(func=cmd_analyze)


def add_foreground_training_parsers(sub: argparse._SubParsersAction) -> None:
    """`train`, `finetune` and `expand`: training in this process, with a progress line."""
    p = sub.add_parser("train", help="train a model in the foreground and save its weights")
    add_model_args(p, json_out=False)
    add_training_args(p, "train")
    p.add_argument("--save", required=True, help="where to write the trained state_dict")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("finetune", help="prune a trained model with a mask and fine-tune the smaller model")
    add_model_args(p, json_out=False)
    add_training_args(p, "finetune")
    p.add_argument("--mask", required=True)
    p.add_argument("--save", required=True, help="where to write the fine-tuned pruned state_dict")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser(
        "expand", help="expand-pruning in the foreground: widen bottlenecks, train, prune, fine-tune"
    )
    add_model_args(p, json_out=False)
    add_experiment_args(p, "expand")
    p.add_argument("--out", required=True, help="folder for the run's checkpoints, masks and summary.json")
    p.set_defaults(func=cmd_expand, procedure="expand-prune")


def add_bottlenecks_parsers(sub: argparse._SubParsersAction) -> None:
    """`bottlenecks`: the flagged layers or stages of a stored analysis."""
    p = sub.add_parser("bottlenecks", help="flag bottleneck layers / stages of a saved analysis at a ratio")
    p.add_argument("analysis", help="folder written by analyze")
    p.add_argument(
        "--ratio", type=float, default=None, help="default: the ratio of the mask analyze wrote (else 0.5)"
    )
    p.add_argument(
        "--unit",
        default=None,
        choices=UNITS + (LATENCY_UNIT,),
        help="default: the unit of the mask analyze wrote",
    )
    p.add_argument("--level", default="layer", choices=LEVELS)
    p.add_argument("--rule", default="mean-std", choices=RULES)
    p.add_argument("-k", type=float, default=1.0, help="mean-std rule: flag ratios below mean - k * std")
    p.add_argument("-n", type=int, default=3, help="least rule: flag the n least pruned")
    add_code_consent_arg(p, "the analysis")
    p.set_defaults(func=cmd_bottlenecks)


def cmd_train(args: argparse.Namespace) -> None:
    wb = workbench_from(args)
    config = train_config_from(args)
    model = wb.model if args.weights else wb.fresh_model(config.seed)  # --seed seeds the initial weights too
    result = train(model, wb.data, config, progress=epoch_printer)
    save_atomically(model.cpu().state_dict(), Path(args.save))
    print(json.dumps({"test_acc": result.test_acc, "test_loss": result.test_loss, "saved": args.save}))


def cmd_finetune(args: argparse.Namespace) -> None:
    distinct_outputs({"--mask": args.mask, "--save": args.save})
    wb = workbench_from(args)
    export = export_pruned(wb, load_mask(args.mask, wb.structures), onnx=False)  # runs and is measured first
    progress_line(exactness_line(export.exactness))
    pruned = export.pruned
    result = train(pruned.model, wb.data, train_config_from(args), progress=epoch_printer)
    save_pruned(args.save, pruned.model.cpu(), pruned.recipe)
    print(json.dumps({"test_acc": result.test_acc, "params": count_params(pruned.model), "saved": args.save}))


def epoch_printer(event: dict) -> None:
    if event.get("phase") == "epoch":
        progress_line(
            f"epoch {event['epoch']}/{event['epochs']}: train loss {event['train_loss']:.4f} "
            f"acc {event['train_acc']:.3f}, val acc {event['val_acc']:.3f}"
        )


def cmd_expand(args: argparse.Namespace) -> None:
    wb = workbench_from(args)
    config = experiment_config(args, "expand-prune")
    if not config.widen:
        if not args.weights:
            progress_line(
                f"no --weights: training the plain net first ({config.epochs} epochs) to find the bottlenecks of "
                "the trained net, as the paper does"
            )
        bar = ProgressLine("plain net")
        config.widen = plain_net_widening(
            config, Path(args.out) / "plain", lambda f, m, d=None: bar(f, m), wb.data
        )
        bar.close()
        progress_line(f"bottlenecks widened x2: {', '.join(config.widen)}")
    bar = ProgressLine("expand-prune")
    summary = Experiment(config, args.out, lambda f, m, d=None: bar(f, m), data=wb.data).run()
    bar.close()
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: summary[k] for k in ("procedure", "test_acc", "params", "macs")}))


def cmd_bottlenecks(args: argparse.Namespace) -> None:
    result = AnalysisResult.load(args.analysis)
    require_code_consent(result.config.setup.model_spec, args.run_code, f"the analysis in '{args.analysis}'")
    if not (math.isfinite(args.k) and args.k >= 0) or args.n < 1:
        raise SospError(f"-k must be a number >= 0 and -n at least 1 (got k={args.k}, n={args.n})")
    written = mask_meta(
        Path(args.analysis) / "mask.json"
    )  # by default, the ratio and unit analyze wrote its mask at
    ratio = args.ratio if args.ratio is not None else float(written.get("ratio", 0.5))
    unit = args.unit or str(written.get("unit", "structures"))
    progress_line(f"bottlenecks of the mask at {ratio:g} of {unit}")
    wb = open_workbench(result.config.setup.with_weights(None))
    latency = LatencyProfile.load(Path(args.analysis) / PROFILE_NAME) if unit == LATENCY_UNIT else None
    table = layer_table(wb.structures, result.mask(wb.structures, ratio, unit, latency))
    units, info = find_bottlenecks(table, args.level, args.rule, args.k, args.n)
    print(units[["rank", "unit", "pruning_ratio", "score", "flagged", "why"]].to_string(index=False))
    print("\n" + explain(units, info))


def cmd_analyze(args: argparse.Namespace) -> None:
    if (
        Path(args.out_dir).exists() and not Path(args.out_dir).is_dir()
    ):  # checked before the work it would lose
        raise SospError(f"--out '{args.out_dir}' is a file; give a folder for the analysis")
    if args.download:
        load_data(args.data, download=True)
    wb = workbench_from(args)
    config = AnalysisConfig.of(wb.setup, analysis_options_from(args))
    bar = ProgressLine(f"{args.method}")
    result = run_analysis(wb, config, progress=bar)
    bar.close()
    out = Path(args.out_dir)
    result.save(out)
    bar = ProgressLine("latency profile") if args.unit == LATENCY_UNIT else None
    timing = LatencyTiming.of(result.config, args.device, args.latency_points)
    mask, latency = mask_at_target(result, wb, out, args.ratio, args.unit, timing, bar)
    if bar is not None:
        bar.close()
    save_mask(out / "mask.json", wb.structures, mask, method=args.method, ratio=args.ratio, unit=args.unit)
    table = layer_table(wb.structures, mask)
    write_safe_csv(table, out / "layers.csv")
    print_mask(table, mask_summary(wb.structures, mask))
    print(exactness_line(result.exactness))
    if latency is not None:
        print_latency(args, wb, mask, latency)
        if noise := latency.noise_warning():
            progress_line(f"warning: {noise}")
    for line in (result.memory or {}).get("line"), result.layer_latency, result.curvature_form:
        if line is not None:
            progress_line(line)
    stages = {**(wb.timings if args.profile_stages else {}), **result.timings}
    progress_line("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    progress_line(f"wrote {out}/analysis.json, tensors.pt, mask.json, layers.csv")
    if args.name:
        store = open_store(args)
        record_id = store_analysis(store, result, args.name)
        progress_line(f"recorded as '{args.name}' ({record_id}) in the workspace {store.root}")


def print_mask(table, summary: dict) -> None:
    """The per-layer table of the written mask and what it removes."""
    print(
        table[
            ["layer", "stage", "channels", "kept", "pruning_ratio", "params_after", "macs_after"]
        ].to_string(index=False)
    )
    print(
        f"\npruned {summary['structures_pruned']}/{summary['structures']} structures; "
        f"params {summary['params_before']:,} -> {summary['params_after']:,} ({summary['param_ratio']:.1%} removed); "
        f"MACs {summary['macs_before']:,} -> {summary['macs_after']:,} ({summary['mac_ratio']:.1%} removed)"
    )


def print_latency(args: argparse.Namespace, wb: Workbench, mask: set[str], latency: LatencyProfile) -> None:
    """The written mask's latency, measured where the profile was, against the target and the prediction."""
    measured = compare_latency(wb.prune(mask).model, wb.model, wb.example, latency.timing(repeats=20))
    print(
        f"latency in {latency.where()}: {1000 * measured.seconds / measured.relative:.3f} ms -> "
        f"{1000 * measured.seconds:.3f} ms, measured {measured.change()} "
        f"(target {args.ratio:.1%} faster, predicted {1 - float(latency.predict(len(mask))):.1%} faster)"
    )


def main(argv: list[str] | None = None) -> int:
    """The CLI: one verb, its result as JSON or a file, an error as one line; exit code 0, 2 (error) or 130."""
    with terminal_streams():
        return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    try:
        set_threads(args.threads)
        if args.threads is not None:
            os.environ["SOSP_THREADS"] = str(args.threads)  # background jobs started from here use the same
        result = args.func(args)
    except SospError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        return _closed_stdout()
    except Exception as exc:  # anything unforeseen is still one line; SOSP_DEBUG=1 shows where it came from
        if os.environ.get("SOSP_DEBUG"):
            raise
        print(f"error: {one_line_error(exc)} (set SOSP_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    if result is not None:
        try:
            emit(result, getattr(args, "out", None))
        except BrokenPipeError:
            return _closed_stdout()
    return 0


def _closed_stdout() -> int:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again; exit like `head`'s writer."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141
