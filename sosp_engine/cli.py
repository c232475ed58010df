"""`python -m sosp_engine`: the command-line face of the engine; progress on stderr, results as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .counting import count_macs, count_params
from .errors import SospError
from .loading import open_workbench
from .masks import layer_table, load_mask, mask_summary, pruned_copy
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


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo name (resnet56, resnet32x4, vgg19, densenet40), torchvision:NAME or file.py:factory")
    p.add_argument("--data", default="digits", help="digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH | synthetic:C,H,W:K")
    p.add_argument("--weights", default=None, help="checkpoint with a state_dict (loaded with weights_only=True)")
    p.add_argument("--exclude", nargs="*", default=[], help="module name patterns never to prune (fnmatch)")
    p.add_argument("--preset", default="auto", help="exclusion preset: auto, none, cifar-resnet, torchvision-resnet")
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
    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


EXTRA_COMMANDS: list = []


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
