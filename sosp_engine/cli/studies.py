"""`study submit|expand|list|show|export`: method studies (methods x targets x seeds) and expand studies (expand- /
widen- / train-pruning x trials) as background jobs, aggregated over seeds or trials."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from ..shown import write_safe_csv
from ..saliency.methods import METHODS
from ..nets.setup import config_from_dict
from .args import (
    add_analysis_args,
    add_model_args,
    add_training_args,
    add_workspace_arg,
    analysis_options_from,
    setup_from,
    train_config_from,
    add_backend_args,
    parse_numbers,
    parse_widen,
    placement_from,
)
from .output import print_damaged, progress_line
from ..shown import terminal_text
from ..errors import SospError, one_line_error
from ..experiments.expand_study import (
    EXPAND_PROCEDURES,
    EXPAND_STUDY_KIND,
    ExpandStudyConfig,
    expand_table,
    unpruned_reference,
)
from ..latency.profile import LATENCY_UNIT
from ..runs.jobs import mark_stale_jobs, submit_expand_study, submit_study
from ..runs.work import STUDY_KINDS
from ..nets import USER_CODE_WARNING, is_user_code
from ..saliency.selection import UNITS
from ..runs.store import Store
from ..experiments.studies import STUDY_KIND, StudyConfig, aggregate
from ..runs.study_state import expand_state, study_cells


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser(
        "study", help="studies: methods x targets x seeds as one background job, mean +- std"
    )
    ssub = study.add_subparsers(dest="study_command", required=True)
    p = ssub.add_parser("submit", help="queue a study")
    add_model_args(
        p, json_out=False, weights_help="a trained checkpoint for every seed (default: train one per seed)"
    )
    p.add_argument(
        "--methods", default="sosp-h,sosp-i,magnitude,random", help=f"comma-separated, from {METHODS}"
    )
    p.add_argument("--targets", default="0.3,0.5,0.7", help="comma-separated pruning ratios")
    p.add_argument(
        "--unit",
        default="params",
        choices=UNITS + (LATENCY_UNIT,),
        help="params or macs compare methods fairly; latency: the CPU latency at batch 1, timed along each "
        "analysis's order",
    )
    add_run_args(p, "study submit")  # the training claims --seed and --batch-size before the analysis
    add_analysis_args(p, "study submit", samples=500)
    p.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds (one trained net and analysis each)"
    )
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.set_defaults(func=cmd_study_submit)
    add_expand_parser(ssub)
    for verb, helptext in (
        ("list", "every study of the workspace"),
        ("show", "the aggregated table of a study"),
        ("export", "write a study's cells and aggregate (CSV or JSON)"),
    ):
        q = ssub.add_parser(verb, help=helptext)
        if verb != "list":
            q.add_argument("study_id")
        if verb == "export":
            q.add_argument(
                "--out", required=True, help="FILE.csv (aggregate), FILE.json (cells and aggregate)"
            )
        q.add_argument(
            "--workspace", default=None, help="workspace folder (default $SOSP_WORKSPACE or ./workspace)"
        )
        q.set_defaults(
            func={"list": cmd_study_list, "show": cmd_study_show, "export": cmd_study_export}[verb]
        )


def add_expand_parser(ssub: argparse._SubParsersAction) -> None:
    p = ssub.add_parser(
        "expand",
        help="queue an expand study: expand- / widen- / train-pruning, trials each, pruned to "
        "the size of the train-pruned plain net (paper sec. 3.4)",
    )
    add_model_args(
        p, json_out=False, weights_help="trained weights of the plain net (default: trained per trial)"
    )
    p.add_argument(
        "--procedures",
        default="expand-prune,widen-prune,train-prune",
        help=f"comma-separated, from {', '.join(EXPAND_PROCEDURES)} (train-prune is needed)",
    )
    p.add_argument("--trials", type=int, default=3)
    p.add_argument(
        "--widen",
        nargs="*",
        default=[],
        help="LAYER_OR_STAGE=FACTOR ... to widen (default: the bottlenecks of the trained plain net)",
    )
    p.add_argument(
        "--widen-by", type=float, default=2.0, help="the factor of the bottlenecks found on the trained net"
    )
    add_run_args(p, "study expand")
    add_analysis_args(p, "study expand", samples=500)
    p.add_argument(
        "--ratio", type=float, default=0.5, help="the plain net's pruning ratio; it sets every run's size"
    )
    p.add_argument("--unit", default="params", choices=UNITS)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.set_defaults(func=cmd_study_expand)


def add_run_args(p: argparse.ArgumentParser, verb: str) -> None:
    """The training and placement flags both kinds of study take."""
    add_training_args(p, verb, epochs=10)
    p.add_argument("--name", default="")
    add_backend_args(p)
    add_workspace_arg(p)


def cmd_study_submit(args: argparse.Namespace) -> dict:
    if is_user_code(args.model):
        progress_line(f"warning: {USER_CODE_WARNING}")
    config = StudyConfig(
        setup=setup_from(args),
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        targets=parse_numbers(float, args.targets, "--targets"),
        unit=args.unit,
        seeds=parse_numbers(int, args.seeds, "--seeds"),
        training=train_config_from(args),
        finetune_epochs=args.finetune_epochs,
        analysis=analysis_options_from(args),
    )
    store = Store(args.workspace)
    job_id = submit_study(store, config, args.name, placement=placement_from(args))
    progress_line(f"{len(config.cells)} cells; follow with: study show {job_id}")
    return {"study": job_id, "cells": len(config.cells), "status": store.job(job_id)["status"]}


def cmd_study_expand(args: argparse.Namespace) -> dict:
    if is_user_code(args.model):
        progress_line(f"warning: {USER_CODE_WARNING}")
    config = ExpandStudyConfig(
        setup=setup_from(args),
        procedures=[p.strip() for p in args.procedures.split(",") if p.strip()],
        trials=args.trials,
        widen=parse_widen(args.widen),
        widen_by=args.widen_by,
        ratio=args.ratio,
        unit=args.unit,
        training=train_config_from(args),
        finetune_epochs=args.finetune_epochs,
        analysis=analysis_options_from(args),
    )
    store = Store(args.workspace)
    job_id = submit_expand_study(store, config, args.name, placement=placement_from(args))
    progress_line(f"{len(config.runs)} runs; follow with: study show {job_id}")
    return {"study": job_id, "runs": len(config.runs), "status": store.job(job_id)["status"]}


def _study(args: argparse.Namespace) -> tuple[Store, dict]:
    store = Store(args.workspace)
    mark_stale_jobs(store)
    job = store.job(args.study_id)
    if job["kind"] not in STUDY_KINDS:
        raise SospError(f"job '{args.study_id}' is a {job['kind']} job, not a study")
    return store, job


def cmd_study_list(args: argparse.Namespace) -> None:
    store = Store(args.workspace)
    mark_stale_jobs(store)
    damaged: list[str] = []
    for job in store.jobs(damaged=damaged):
        if job["kind"] not in STUDY_KINDS:
            continue
        try:
            print(terminal_text(study_line(job)))
        except (
            SospError,
            OSError,
            ValueError,
            KeyError,
            TypeError,
        ) as exc:  # its files, not its row, are bad
            damaged.append(f"{job['id']}: its run folder cannot be read ({one_line_error(exc)})")
    print_damaged("study", damaged)


def study_line(job: dict) -> str:
    """One study's line of `study list`: id, status, cells or runs done of all, name."""
    if job["kind"] == STUDY_KIND:
        total = len(config_from_dict(StudyConfig, job["config"]).cells)
        return f"{job['id']}  {job['status']:<10} {len(study_cells(job))}/{total} cells  {job['name']}"
    total = len(config_from_dict(ExpandStudyConfig, job["config"]).runs)
    return f"{job['id']}  {job['status']:<10} {len(expand_state(job)['runs'])}/{total} runs   {job['name']}"


def study_records(job: dict) -> tuple[list[dict], pd.DataFrame, dict]:
    """A study's finished records, their aggregate, and what else the export carries (an expand study's plan and the
    unpruned reference)."""
    if job["kind"] == EXPAND_STUDY_KIND:
        state = expand_state(job)
        return (
            state["runs"],
            expand_table(state["runs"]),
            {"plan": state["plan"], "unpruned": unpruned_reference(state["runs"], state["plan"])},
        )
    cells = study_cells(job)
    return cells, aggregate(cells), {}


def cmd_study_show(args: argparse.Namespace) -> dict:
    _, job = _study(args)
    _, table, extra = study_records(job)
    progress_line(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return {
        "study": job["id"],
        "kind": job["kind"],
        "status": job["status"],
        "progress": job["progress"],
        "aggregate": table.to_dict(orient="records"),
        **extra,
    }


def cmd_study_export(args: argparse.Namespace) -> None:
    _, job = _study(args)
    records, table, extra = study_records(job)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        write_safe_csv(table, out)
    else:
        key = "runs" if job["kind"] == EXPAND_STUDY_KIND else "cells"
        out.write_text(
            json.dumps(
                {
                    "study": job["id"],
                    "kind": job["kind"],
                    "config": job["config"],
                    key: records,
                    "aggregate": table.to_dict(orient="records"),
                    **extra,
                },
                indent=1,
            )
        )
    progress_line(f"wrote {out}")
