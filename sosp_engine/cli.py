"""`python -m sosp_engine`: the command-line face of the engine; progress on stderr, results as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .analysis import METHODS, AnalysisConfig, run_analysis
from .counting import count_macs, count_params
from .data import load_data
from .errors import SospError
from .loading import open_workbench
from .masks import layer_table, load_mask, mask_summary, pruned_copy, save_mask
from .saliency.common import LOSSES
from .selection import NORMALIZATIONS, UNITS
from .models import USER_CODE_WARNING, is_user_code


def progress_line(message: str) -> None:
    """One progress line on stderr (stdout is kept for results)."""
    print(message, file=sys.stderr, flush=True)


def emit(result: dict, out: str | None) -> None:
    """Print the result as JSON on stdout, or write it to `out`."""
    text = json.dumps(result, indent=1, default=str)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        progress_line(f"wrote {out}")
    else:
        print(text)


def add_model_args(p: argparse.ArgumentParser, json_out: bool = True) -> None:
    p.add_argument("--model", required=True, help="zoo name (resnet56, resnet32x4, vgg19, densenet40), torchvision:NAME or file.py:factory")
    p.add_argument("--data", default="digits", help="digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH | synthetic:C,H,W:K")
    p.add_argument("--weights", default=None, help="checkpoint with a state_dict (loaded with weights_only=True)")
    p.add_argument("--exclude", nargs="*", default=[], help="module name patterns never to prune (fnmatch)")
    p.add_argument("--preset", default="auto", help="exclusion preset: auto, none, cifar-resnet, torchvision-resnet")
    if json_out:
        p.add_argument("--out", default=None, help="write the JSON result here instead of stdout")


def workbench_from(args: argparse.Namespace):
    if is_user_code(args.model):
        progress_line(f"warning: {USER_CODE_WARNING}")
    progress_line(f"loading {args.model} on {args.data} ...")
    return open_workbench(args.model, args.data, args.weights, args.exclude, args.preset)


def cmd_info(args: argparse.Namespace) -> dict:
    wb = workbench_from(args)
    summary = mask_summary(wb.structures)
    return {
        "model": args.model, "data": args.data, "num_classes": wb.data.num_classes,
        "input_shape": list(wb.data.input_shape), "layers": len(wb.structures.layers),
        "structures": summary["structures"], "params": summary["params_before"], "macs": summary["macs_before"],
        "excluded_modules": wb.structures.excluded,
        "layer_table": layer_table(wb.structures).to_dict(orient="records"),
    }


def cmd_prune(args: argparse.Namespace) -> dict:
    wb = workbench_from(args)
    mask = load_mask(args.mask, wb.structures)
    progress_line(f"pruning {len(mask)} structures physically ...")
    smaller = pruned_copy(wb.model, wb.structures, mask, wb.example)
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    torch.save(smaller.state_dict(), args.save)
    summary = mask_summary(wb.structures, mask)
    return {**summary, "params_counted": count_params(smaller), "macs_counted": count_macs(smaller, wb.example),
            "saved": args.save}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sosp_engine", description="SOSP Lab engine")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="model summary: prunable layers, structures, parameters, MACs")
    add_model_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("prune", help="apply a mask JSON physically and save the smaller model's state_dict")
    add_model_args(p)
    p.add_argument("--mask", required=True, help="mask JSON (from analyze or the dashboard)")
    p.add_argument("--save", required=True, help="where to write the pruned model's state_dict")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("analyze", help="compute a method's saliencies and pruning order; write the result and a mask")
    add_model_args(p, json_out=False)
    p.add_argument("--at-init", action="store_true", help="analyse a fresh seeded initialisation (BatchNorm statistics re-estimated)")
    p.add_argument("--method", default="sosp-h", choices=METHODS)
    p.add_argument("--samples", type=int, default=1000, help="N': analysis samples drawn from the training split")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", type=float, default=0.5, help="target pruning ratio of the written mask")
    p.add_argument("--unit", default="structures", choices=UNITS)
    p.add_argument("--cap", type=float, default=0.95, help="at most this fraction of a layer is pruned")
    p.add_argument("--normalize", default="none", choices=NORMALIZATIONS)
    p.add_argument("--loss", default="cross-entropy", choices=LOSSES)
    p.add_argument("--device", default="auto")
    p.add_argument("--mc-labels", type=int, default=-1, help="SOSP-I: sampled labels per sample (0 = exact, -1 = only when D > 100)")
    p.add_argument("--download", action="store_true", help="download CIFAR into the data path first")
    p.add_argument("--out", dest="out_dir", required=True, help="folder for analysis.json, tensors.pt, mask.json, layers.csv")
    p.set_defaults(func=cmd_analyze)
    return parser


def cmd_analyze(args: argparse.Namespace) -> None:
    if args.download:
        load_data(args.data, download=True)
    wb = workbench_from(args)
    config = AnalysisConfig(
        method=args.method, model_spec=args.model, data_spec=args.data, weights=args.weights, at_init=args.at_init,
        samples=args.samples, seed=args.seed, batch_size=args.batch_size, cap=args.cap, normalize=args.normalize,
        loss=args.loss, device=args.device, mc_labels=args.mc_labels, exclude=list(args.exclude), preset=args.preset)
    bar = ProgressLine(f"{args.method}")
    result = run_analysis(wb, config, progress=bar)
    bar.close()
    mask = result.mask(wb.structures, args.ratio, args.unit)
    out = Path(args.out_dir)
    result.save(out)
    save_mask(out / "mask.json", wb.structures, mask, method=args.method, ratio=args.ratio, unit=args.unit)
    table = layer_table(wb.structures, mask)
    table.to_csv(out / "layers.csv", index=False)
    summary = mask_summary(wb.structures, mask)
    print(table[["layer", "stage", "channels", "kept", "pruning_ratio", "params_after", "macs_after"]].to_string(index=False))
    print(f"\npruned {summary['structures_pruned']}/{summary['structures']} structures; "
          f"params {summary['params_before']:,} -> {summary['params_after']:,} ({summary['param_ratio']:.1%} removed); "
          f"MACs {summary['macs_before']:,} -> {summary['macs_after']:,} ({summary['mac_ratio']:.1%} removed)")
    progress_line(f"timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    progress_line(f"wrote {out}/analysis.json, tensors.pt, mask.json, layers.csv")


class ProgressLine:
    """A single updating progress line on stderr."""

    def __init__(self, label: str) -> None:
        self.label, self.last = label, -1

    def __call__(self, fraction: float, message: str) -> None:
        percent = int(fraction * 100)
        if percent != self.last:
            self.last = percent
            print(f"\r{self.label}: {percent:3d}% {message:<40}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except SospError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
    if result is not None:
        emit(result, getattr(args, "out", None))
    return 0
