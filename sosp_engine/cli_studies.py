"""`study submit|list|show|export`: grids of methods x targets x seeds as background jobs, aggregated over seeds."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .analysis import METHODS
from .cli_args import add_backend_args, add_distributed_args, placement_from
from .cli_output import progress_line
from .errors import SospError
from .jobs import mark_stale_jobs, submit_study
from .models import USER_CODE_WARNING, is_user_code
from .selection import NORMALIZATIONS, UNITS
from .store import Store
from .studies import STUDY_KIND, StudyConfig, aggregate, parse_numbers, study_cells


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="studies: methods x targets x seeds as one background job, mean +- std")
    ssub = study.add_subparsers(dest="study_command", required=True)
    p = ssub.add_parser("submit", help="queue a study")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="digits")
    p.add_argument("--weights", default=None, help="a trained checkpoint for every seed (default: train one per seed)")
    p.add_argument("--methods", default="sosp-h,sosp-i,magnitude,random", help=f"comma-separated, from {METHODS}")
    p.add_argument("--targets", default="0.3,0.5,0.7", help="comma-separated pruning ratios")
    p.add_argument("--unit", default="params", choices=UNITS, help="params or macs compare methods fairly")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (one trained net and analysis each)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs per seed (ignored with --weights)")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--samples", type=int, default=500, help="N' of each analysis")
    p.add_argument("--cap", type=float, default=0.95)
    p.add_argument("--normalize", default="none", choices=NORMALIZATIONS)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    add_distributed_args(p)
    p.add_argument("--exclude", nargs="*", default=[])
    p.add_argument("--preset", default="auto")
    p.add_argument("--name", default="")
    add_backend_args(p)
    for verb, helptext in (("list", "every study of the workspace"), ("show", "the aggregated table of a study"),
                           ("export", "write a study's cells and aggregate (CSV or JSON)")):
        q = ssub.add_parser(verb, help=helptext)
        if verb != "list":
            q.add_argument("study_id")
        if verb == "export":
            q.add_argument("--out", required=True, help="FILE.csv (aggregate), FILE.json (cells and aggregate)")
        q.add_argument("--workspace", default=None, help="workspace folder (default $SOSP_WORKSPACE or ./workspace)")
        q.set_defaults(func={"list": cmd_study_list, "show": cmd_study_show, "export": cmd_study_export}[verb])
    p.add_argument("--workspace", default=None, help="workspace folder (default $SOSP_WORKSPACE or ./workspace)")
    p.set_defaults(func=cmd_study_submit)


def cmd_study_submit(args: argparse.Namespace) -> dict:
    if is_user_code(args.model):
        progress_line(f"warning: {USER_CODE_WARNING}")
    config = StudyConfig(model_spec=args.model, data_spec=args.data, weights=args.weights,
                         methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                         targets=parse_numbers(float, args.targets, "--targets"), unit=args.unit,
                         seeds=parse_numbers(int, args.seeds, "--seeds"), epochs=args.epochs,
                         finetune_epochs=args.finetune_epochs, samples=args.samples, cap=args.cap,
                         normalize=args.normalize, lr=args.lr, batch_size=args.batch_size, device=args.device,
                         exclude=args.exclude, preset=args.preset, nproc=args.nproc, sync_bn=args.sync_bn)
    store = Store(args.workspace)
    job_id = submit_study(store, config, args.name, placement=placement_from(args))
    progress_line(f"{len(config.cells)} cells; follow with: study show {job_id}")
    return {"study": job_id, "cells": len(config.cells), "status": store.job(job_id)["status"]}


def _study(args: argparse.Namespace) -> tuple[Store, dict]:
    store = Store(args.workspace)
    mark_stale_jobs(store)
    job = store.job(args.study_id)
    if job["kind"] != STUDY_KIND:
        raise SospError(f"job '{args.study_id}' is a {job['kind']} job, not a study")
    return store, job


def cmd_study_list(args: argparse.Namespace) -> None:
    store = Store(args.workspace)
    mark_stale_jobs(store)
    for job in store.jobs():
        if job["kind"] == STUDY_KIND:
            total = len(StudyConfig(**job["config"]).cells)
            print(f"{job['id']}  {job['status']:<10} {len(study_cells(job))}/{total} cells  {job['name']}")


def cmd_study_show(args: argparse.Namespace) -> dict:
    _, job = _study(args)
    table = aggregate(study_cells(job))
    progress_line(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return {"study": job["id"], "status": job["status"], "progress": job["progress"],
            "aggregate": table.to_dict(orient="records")}


def cmd_study_export(args: argparse.Namespace) -> None:
    _, job = _study(args)
    cells = study_cells(job)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        aggregate(cells).to_csv(out, index=False)
    else:
        out.write_text(json.dumps({"study": job["id"], "config": job["config"], "cells": cells,
                                   "aggregate": aggregate(cells).to_dict(orient="records")}, indent=1))
    progress_line(f"wrote {out}")
