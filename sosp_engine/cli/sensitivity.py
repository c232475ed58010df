"""`sensitivity ANALYSIS`: the measured and predicted cost of pruning along a saved analysis's order, as CSV or JSON."""

from __future__ import annotations

import argparse

import pandas as pd
from pathlib import Path

from ..shown import write_safe_csv
from ..saliency.analysis import AnalysisResult
from .args import add_code_consent_arg
from .output import ProgressLine, progress_line
from ..errors import SospError
from ..pruning.workbench import open_workbench
from ..runs.records import require_code_consent
from ..saliency.selection import UNITS
from ..experiments.trust import TrustPlan, trust_check
from ..experiments.sensitivity import (
    Evaluation,
    distinct_masks,
    even_grid,
    max_reduction,
    parse_grid,
    sensitivity_curve,
)


def add_sensitivity_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity",
        help="accuracy and loss of a saved analysis's masks over a grid of ratios, "
        "next to the predicted loss increase (no saliency recomputed)",
    )
    p.add_argument("analysis", help="folder written by analyze")
    p.add_argument(
        "--grid", default=None, help="comma-separated ratios, e.g. 0,0.2,0.4,0.6 (default: --points even)"
    )
    p.add_argument(
        "--points", type=int, default=11, help="evenly spaced ratios from 0 to the largest the cap allows"
    )
    p.add_argument("--unit", default="structures", choices=UNITS, help="what the ratios count")
    p.add_argument("--split", default="val", choices=("val", "test", "train_eval"), help="evaluation split")
    p.add_argument("--samples", type=int, default=None, help="evaluate on the first N samples of the split")
    p.add_argument(
        "--weights", default=None, help="the analysis's checkpoint, if it moved (must be the same weights)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write FILE.csv (the table) or FILE.json (table and summary)")
    add_code_consent_arg(p, "the analysis")
    p.set_defaults(func=cmd_sensitivity)
    p = sub.add_parser(
        "trust",
        help="how far to trust an analysis: its ranking of independent masks against measured losses, the "
        "baselines' on the same masks, and its calibration along the order",
    )
    p.add_argument("analysis", help="folder written by analyze")
    p.add_argument("--ratio", type=float, default=0.1, help="structures per independent mask (share of all)")
    p.add_argument(
        "--masks", type=int, default=64, help="independent masks (half random, half near the order)"
    )
    p.add_argument("--factor", type=float, default=2.0, help="the prediction holds where within this factor")
    p.add_argument("--split", default="val", choices=("val", "test", "train_eval"), help="evaluation split")
    p.add_argument("--samples", type=int, default=None, help="evaluate on the first N samples of the split")
    p.add_argument("--weights", default=None, help="the analysis's checkpoint, if it moved")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the report as FILE.json")
    add_code_consent_arg(p, "the analysis")
    p.set_defaults(func=cmd_trust)


def cmd_trust(args: argparse.Namespace) -> dict:
    result = AnalysisResult.load(args.analysis)
    config = result.config
    require_code_consent(config.setup.model_spec, args.run_code, f"the analysis in '{args.analysis}'")
    if not 0 < args.ratio < 1:
        raise SospError(f"--ratio must be in (0, 1), got {args.ratio}")
    progress_line(f"loading {config.setup.model_spec} on {config.setup.data_spec} ...")
    wb = open_workbench(result.opening_setup(args.weights))
    bar = ProgressLine("trust")
    plan = TrustPlan(args.ratio, args.masks, factor=args.factor)
    report = trust_check(result, wb, plan, Evaluation(args.split, args.samples, device=args.device), bar)
    bar.close()
    progress_line(pd.DataFrame(report.calibration).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    progress_line(
        "ranking scores (Spearman, mean of the random and near-order families): "
        + ", ".join(
            [f"{report.method} {report.score:.2f}"]
            + [f"{k} {v:.2f}" for k, v in report.baseline_scores.items()]
        )
    )
    progress_line(report.verdict)
    return report.to_json()


def cmd_sensitivity(args: argparse.Namespace) -> dict | None:
    result = AnalysisResult.load(args.analysis)
    config = result.config
    require_code_consent(config.setup.model_spec, args.run_code, f"the analysis in '{args.analysis}'")
    if args.samples is not None and args.samples < 1:
        raise SospError(f"--samples must be positive, got {args.samples}")
    progress_line(f"loading {config.setup.model_spec} on {config.setup.data_spec} ...")
    wb = open_workbench(result.opening_setup(args.weights))
    if args.grid:
        ratios = parse_grid(args.grid)
    else:
        ratios = even_grid(
            args.points, max_reduction(result, wb.structures, args.unit), distinct_masks(result)
        )
    bar = ProgressLine("sensitivity")
    evaluation = Evaluation(args.split, args.samples, device=args.device)
    curve = sensitivity_curve(result, wb, ratios, args.unit, evaluation, progress=bar)
    bar.close()
    progress_line(
        curve.table.drop(columns=["unit"]).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    )
    progress_line(
        f"unpruned: loss {curve.baseline_loss:.4f}, accuracy {curve.baseline_acc:.1%} on {curve.samples} "
        f"{curve.split} samples; rank correlation of predicted vs measured loss increase along the order: "
        f"{curve.rank_correlation:.3f} (near 1 for any method; `trust {args.analysis}` checks the ranking)"
    )
    if args.out and Path(args.out).suffix.lower() == ".csv":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_safe_csv(curve.table, args.out)
        progress_line(f"wrote {args.out}")
        return None
    return curve.to_json()
