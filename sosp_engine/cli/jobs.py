"""`run-job` and `jobs submit|list|show|cancel|resume|logs|delete`: background jobs from the command line."""

from __future__ import annotations

import argparse

from ..nets import USER_CODE_WARNING, is_user_code
from ..experiments.procedures import PROCEDURES
from ..runs.jobs import cancel, mark_stale_jobs, resume, run_job, submit
from ..runs.work import read_log
from .args import (
    add_code_consent_arg,
    add_backend_args,
    add_experiment_args,
    add_model_args,
    add_workspace_arg,
    experiment_config,
    open_store,
    placement_from,
)
from ..shown import terminal_text
from .output import print_damaged, progress_line


def add_jobs_parser(sub: argparse._SubParsersAction) -> None:
    """The `run-job` (internal) and `jobs` verbs."""
    p = sub.add_parser("run-job", help="(internal) run a queued job in this process")
    p.add_argument("job_id")
    add_workspace_arg(p)
    p.set_defaults(func=cmd_run_job)
    jobs = sub.add_parser("jobs", help="background jobs: submit, list, show, cancel, resume, logs, delete")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    p = jsub.add_parser("submit", help="queue a procedure as a background job")
    add_model_args(p, json_out=False)
    add_experiment_args(p, "jobs submit")
    p.add_argument("--procedure", default="train-prune", choices=PROCEDURES)
    p.add_argument("--name", default="")
    add_backend_args(p)
    add_workspace_arg(p)
    p.set_defaults(func=cmd_jobs_submit)
    for verb, func, helptext in (
        ("show", cmd_jobs_show, "a job's record and metrics"),
        ("cancel", cmd_jobs_cancel, "cancel a job"),
        ("resume", cmd_jobs_resume, "resume a failed or cancelled job"),
        ("logs", cmd_jobs_logs, "a job's log"),
    ):
        p = jsub.add_parser(verb, help=helptext)
        p.add_argument("job_id")
        add_workspace_arg(p)
        if verb == "resume":
            add_code_consent_arg(p, "the job")
        p.set_defaults(func=func)
    p = jsub.add_parser("list", help="all jobs of the workspace")
    add_workspace_arg(p)
    p.set_defaults(func=cmd_jobs_list)
    p = jsub.add_parser("delete", help="delete a job and its artifacts")
    p.add_argument("job_id")
    p.add_argument("--yes", action="store_true", help="confirm: the job's files are removed for good")
    add_workspace_arg(p)
    p.set_defaults(func=cmd_jobs_delete)


def cmd_run_job(args: argparse.Namespace) -> None:
    raise SystemExit(run_job(open_store(args), args.job_id))


def cmd_jobs_submit(args: argparse.Namespace) -> dict:
    if is_user_code(args.model):
        progress_line(f"warning: {USER_CODE_WARNING}")
    store = open_store(args)
    job_id = submit(store, experiment_config(args, args.procedure), args.name, placement=placement_from(args))
    return {"job": job_id, "status": store.job(job_id)["status"]}


def cmd_jobs_list(args: argparse.Namespace) -> None:
    store = open_store(args)
    mark_stale_jobs(store)
    damaged: list[str] = []
    for job in store.jobs(damaged=damaged):
        where = job["backend"] + (f" on {job['node']}" if job["node"] else "")
        print(
            terminal_text(
                f"{job['id']}  {job['status']:<10} {job['progress']:6.1%}  {job['kind']:<13} {where:<24} "
                f"{job['name']}  {job['message']}"
            )
        )
    print_damaged("job", damaged)


def cmd_jobs_show(args: argparse.Namespace) -> dict:
    store = open_store(args)
    mark_stale_jobs(store)
    return {**store.job(args.job_id), "metrics": store.metrics(args.job_id)}


def cmd_jobs_cancel(args: argparse.Namespace) -> dict:
    return {"job": args.job_id, "status": cancel(open_store(args), args.job_id)}


def cmd_jobs_resume(args: argparse.Namespace) -> dict:
    store = open_store(args)
    resume(store, args.job_id, run_code=args.run_code)
    return {"job": args.job_id, "status": store.job(args.job_id)["status"]}


def cmd_jobs_logs(args: argparse.Namespace) -> None:
    print(read_log(open_store(args), args.job_id))


def cmd_jobs_delete(args: argparse.Namespace) -> dict:
    store = open_store(args)
    orphans = store.analyses_on_weights_of(args.job_id) if args.yes else []
    kept = store.delete("job", args.job_id, confirm=args.yes)
    for line in kept:
        progress_line(f"warning: left in place: {line}")
    for record in orphans:
        progress_line(
            f"note: analysis '{record['name']}' ({record['id']}) stays listed; the job's weights it was computed on "
            "are deleted"
        )
    return {"job": args.job_id, "deleted": True, "not_removed": kept}
