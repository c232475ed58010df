"""`deployment ANALYSIS`: what the analysis's masks buy at deployment, measured in PyTorch eager and ONNX Runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..shown import write_safe_csv
from ..devices import resolve_device
from ..errors import SospError
from .args import add_code_consent_arg, parse_numbers
from ..latency.deployment import (
    DeploymentGrid,
    efficiency_summary,
    efficiency_table,
    order_variants,
    unresolved_warning,
)
from ..latency.runtimes import RUNTIMES
from ..pruning.workbench import open_workbench
from ..runs.records import require_code_consent
from ..saliency.analysis import AnalysisResult
from .output import ProgressLine, progress_line


def add_deployment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deployment",
        help="latency drop against MAC drop along a saved analysis's order (and the order rounded), in each "
        "runtime and batch size: what its masks buy where the model ships",
    )
    p.add_argument("analysis", help="folder written by analyze")
    p.add_argument(
        "--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, from {', '.join(RUNTIMES)}"
    )
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes to time")
    p.add_argument("--points", type=int, default=5, help="pruned nets timed along each order (evenly spaced)")
    p.add_argument(
        "--round-to", default="8", help="comma-separated multiples to regroup the order to as well (1: none)"
    )
    p.add_argument(
        "--repeats", type=int, default=10, help="timed inferences per net (alternating with the unpruned)"
    )
    p.add_argument("--device", default="cpu", help="where to time")
    p.add_argument("--weights", default=None, help="the analysis's checkpoint, if it moved")
    p.add_argument("--out", default=None, help="write FILE.csv (the table) or FILE.json (table and summary)")
    add_code_consent_arg(p, "the analysis")
    p.set_defaults(func=cmd_deployment)


def _numbers(text: str, flag: str) -> list[int]:
    values = parse_numbers(int, text, flag)
    if not values or any(v < 1 for v in values):
        raise SospError(f"{flag} takes whole numbers >= 1, got '{text}'")
    return values


def cmd_deployment(args: argparse.Namespace) -> dict | None:
    result = AnalysisResult.load(args.analysis)
    config = result.config
    require_code_consent(config.setup.model_spec, args.run_code, f"the analysis in '{args.analysis}'")
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    batches, round_to = _numbers(args.batches, "--batches"), _numbers(args.round_to, "--round-to")
    if not 2 <= args.points <= 41 or args.repeats < 1:
        raise SospError(
            f"--points must be in 2 .. 41 and --repeats at least 1, got {args.points}, {args.repeats}"
        )
    progress_line(f"loading {config.setup.model_spec} on {config.setup.data_spec} ...")
    wb = open_workbench(result.opening_setup(args.weights))
    bar = ProgressLine("deployment")
    grid = DeploymentGrid(runtimes, batches, args.points, str(resolve_device(args.device)), args.repeats)
    table = efficiency_table(wb, order_variants(result, wb.structures, round_to), grid, progress=bar)
    bar.close()
    shown = table.drop(columns=["threads", "device"])
    progress_line(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    progress_line(
        f"timed on {table['device'].iloc[0]} with {table['threads'].iloc[0]} threads; efficiency = latency drop "
        "/ MAC drop (1: every saved MAC is saved time)"
    )
    progress_line(efficiency_summary(table).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if unresolved := unresolved_warning(table):
        progress_line(f"warning: {unresolved}")
    if args.out and Path(args.out).suffix.lower() == ".csv":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_safe_csv(table, args.out)
        progress_line(f"wrote {args.out}")
        return None
    return {"rows": table.to_dict("records"), "summary": efficiency_summary(table).to_dict("records")}
