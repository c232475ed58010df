"""Every table of docs/benchmarks.md, from one command, into dated result files.

    python bench/regenerate.py [--only saliency,peers,width,imagenet,deployment,narrow-convs] [--rounds 2] [--threads 1]

Each section runs, writes its rows to bench/results/SECTION-DATE.jsonl and replaces its own section of
docs/benchmarks.md (between its markers), stating the commit, the load average, the threads, the process layout and
whether the timed call is the whole user call. Saliency tasks run each in a fresh process (peak memory is the
process's own), in `--rounds` interleaved rounds (every task once per round, in turn), and the table gives medians;
every ratio is to the median forward+backward of the same model and N' in the same run. NNI's sensitivity analysis
needs NNI 2.x on the path (see the peers section); without it its row says so.
About 45 minutes on a 2-core CPU with one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import ROOT, dated_results, finished, provenance, provenance_line, replace_section  # noqa: E402

FRESH = "each task in a fresh process, rounds interleaved, medians"
KERNEL_ONLY = (
    "the timed call is the saliency computation alone (model built, samples drawn and warm-up untimed)"
)
WHAT_IT_RANKS = {
    "forward+backward": "the baseline: one forward+backward over the same samples and batches",
    "sosp-h": "every structure globally; second order with cross-structure terms (one Hessian-vector product)",
    "sosp-i": "every structure globally, with pairwise correlations (S x S Gauss-Newton matrix, greedy selection)",
    "sosp-i-factor": "the same order, the Gauss-Newton matrix kept as its R x S factor (rows of Q formed in blocks)",
    "sosp-i-floor": "SOSP-I's own passes without products or matrix: a lower bound on SOSP-I by construction",
    "analysis-sosp-h": "SOSP-H as the user calls it, warm: `run_analysis` whole (sampling, copy, selection, "
    "exactness check), after a first call in the same process (a second analysis in the dashboard or a study)",
    "analysis-sosp-h-cold": "the same call as the first of a fresh process that only opened the workbench (the CLI's "
    "`analyze`)",
    "analysis-sosp-i": "SOSP-I as the user calls it, warm: `run_analysis` whole, after a first call, in the form it "
    "chooses (the factor where R < S)",
    "analysis-sosp-i-cold": "the same call as the first of a fresh process that only opened the workbench",
    "diagonal-mc1": "every structure, no correlations: the Gauss-Newton diagonal from 1 sampled label",
    "tp-taylor": "torch-pruning GroupTaylorImportance: per coupled group, first order abs(w g), no correlations",
    "tp-obdc": "torch-pruning OBDCImportance (EigenDamage): per group, diagonal in the Kronecker eigenbasis",
    "tp-hessian": "torch-pruning GroupHessianImportance, its documented recipe: a backward per sample through "
    "the batch graph; per group, squared-gradient diagonal",
    "tp-hessian-b1": "the same importance, its cheapest recipe: forward+backward per sample at batch 1",
    "nni-sensitivity": "NNI 2.10 SensitivityAnalysis: each conv pruned alone (L1) at 25/50/75 %, the loss "
    "evaluated; per layer, no structure ranking",
    "sosp-i-mc16": "SOSP-I with 16 sampled labels per sample (the default for D > 100)",
    "sosp-i-factor-mc16": "the same, the Gauss-Newton matrix kept as its R x S factor",
}
SECTIONS = {
    "saliency": dict(
        models=["resnet56", "vgg19", "densenet40"],
        tasks="forward+backward,sosp-h,sosp-i-floor,sosp-i,analysis-sosp-h-cold,analysis-sosp-h,"
        "analysis-sosp-i-cold,analysis-sosp-i,diagonal-mc1,tp-taylor,tp-obdc",
        samples=200,
        title="Saliency cost with the peers (N' = 200, CIFAR shape, D = 10)",
    ),
    "peers": dict(
        models=["resnet56"],
        tasks="forward+backward,sosp-h,sosp-i,tp-hessian,tp-hessian-b1,nni-sensitivity",
        samples=100,
        title="The slow peers on ResNet-56 (N' = 100)",
    ),
    "width": dict(
        models=["resnet56", "resnet56x2", "resnet56x4"],
        tasks="forward+backward,sosp-h,sosp-i",
        samples=100,
        title="Cost over width (the paper's Fig. 2 analogue, N' = 100)",
    ),
    "sosp-i-forms": dict(
        models=["resnet56", "vgg19", "densenet40"],
        tasks="forward+backward,sosp-h,sosp-i-floor,sosp-i,sosp-i-factor,analysis-sosp-i",
        samples=200,
        title="SOSP-I in either form, and SOSP-H's peak memory (N' = 200, CIFAR shape, D = 10)",
    ),
    "vit-forms": dict(
        models=["torchvision:vit_b_16"],
        tasks="forward+backward,sosp-i-mc16,sosp-i-factor-mc16",
        samples=32,
        input="3,224,224",
        classes=1000,
        batch_size=16,
        title="SOSP-I's two forms on ViT-B/16 (3x224x224, D = 1000, 16 sampled labels, N' = 32, batch 16)",
    ),
    "imagenet": dict(
        models=["torchvision:resnet50"],
        tasks="forward+backward,sosp-h,sosp-i-mc16",
        samples=32,
        input="3,224,224",
        classes=1000,
        batch_size=16,
        title="ImageNet size (torchvision ResNet-50, 3x224x224, D = 1000, N' = 32, batch 16)",
    ),
}


def run_saliency_section(name: str, rounds: int, threads: int) -> str:
    """Measure one saliency section in interleaved rounds; write its rows; return its markdown."""
    from bench.bench_saliency import measure

    spec = SECTIONS[name]
    shape = tuple(int(v) for v in spec.get("input", "3,32,32").split(","))
    run = provenance(threads, FRESH, KERNEL_ONLY + "; `analysis-*` rows time the whole user call")
    rows = []
    out = dated_results(f"saliency-{name}" + ("-quick" if spec["models"] == ["resnet20"] else ""))
    for model in spec["models"]:
        for round_index in range(rounds):
            for task in spec["tasks"].split(","):
                if task == "nni-sensitivity" and not _has_nni():
                    rows.append(
                        {"model": model, "task": task, "round": round_index, "error": "NNI 2.x not installed"}
                    )
                    continue
                result = measure(
                    task,
                    model,
                    spec["samples"],
                    "cpu",
                    shape,
                    spec.get("classes", 10),
                    spec.get("batch_size", 100),
                )
                row = {
                    "model": model,
                    "task": task,
                    "round": round_index,
                    "samples": spec["samples"],
                    **result,
                }
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    run = finished(run)
    with out.open("a") as fh:
        fh.writelines(json.dumps({**r, **run}) + "\n" for r in rows)
    return render_saliency(spec, rows, run, out, rounds)


def _has_nni() -> bool:
    try:
        import nni  # noqa: F401
    except ImportError:
        return False
    return True


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per model and task: median seconds over the rounds, largest peak RSS, S, and an error if every round failed."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        grouped.setdefault((r["model"], r["task"]), []).append(r)
    summary = {}
    for key, group in grouped.items():
        ok = [r for r in group if r.get("seconds") == r.get("seconds") and r.get("seconds") is not None]
        summary[key] = {
            "seconds": statistics.median(r["seconds"] for r in ok) if ok else None,
            "spread": (max(r["seconds"] for r in ok) - min(r["seconds"] for r in ok))
            if len(ok) > 1
            else None,
            "rss": max(r["peak_rss_mb"] for r in ok) if ok else None,
            "structures": next((r.get("structures") for r in ok if r.get("structures")), None),
            "error": None if ok else group[0].get("error", "failed"),
            "form": next((r["curvature_form"] for r in ok if r.get("curvature_form")), None),
            "stages": {
                stage: statistics.median(r["stages"][stage] for r in ok if stage in r.get("stages", {}))
                for stage in (ok[0].get("stages") or {} if ok else {})
            },
        }
    return summary


def _form_and_memory_checks(model: str, summary: dict) -> list[str]:
    """The factor form's time against the matrix form's, and SOSP-H's peak RSS against one forward+backward's."""
    checks = []
    base = summary.get((model, "forward+backward"), {})
    for matrix_task, factor_task in (("sosp-i", "sosp-i-factor"), ("sosp-i-mc16", "sosp-i-factor-mc16")):
        matrix, factor = summary.get((model, matrix_task)), summary.get((model, factor_task))
        if matrix and factor and matrix["seconds"] and factor["seconds"]:
            checks.append(
                f"- {model}: SOSP-I's factor form / its matrix form = **{factor['seconds'] / matrix['seconds']:.2f}** "
                f"in time, **{factor['rss'] / matrix['rss']:.2f}** in peak RSS"
            )
    sosp_h = summary.get((model, "sosp-h"))
    if sosp_h and sosp_h["rss"] and base.get("rss"):
        ratio = sosp_h["rss"] / base["rss"]
        checks.append(
            f"- {model}: SOSP-H's peak RSS / one forward+backward's = **{ratio:.2f}** "
            + ("(at most 1.5)" if ratio <= 1.5 else "(above 1.5)")
        )
    return checks


def render_saliency(spec: dict, rows: list[dict], run: dict, out: Path, rounds: int) -> str:
    summary = summarise(rows)
    lines = [f"## {spec['title']}", "", provenance_line(run) + f" {rounds} round(s).", ""]
    lines += [f"Rows: `{out.relative_to(ROOT)}`.", ""]
    lines += [
        "| model | S | task | seconds (median) | x forward+backward | peak RSS (MB) | what it ranks |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    checks = []
    for model in spec["models"]:
        base = summary.get((model, "forward+backward"), {}).get("seconds")
        for task in spec["tasks"].split(","):
            s = summary.get((model, task))
            if s is None:
                continue
            if s["seconds"] is None:
                lines.append(
                    f"| {model} | - | {task} | {s['error']} | - | - | {WHAT_IT_RANKS.get(task, '')} |"
                )
                continue
            spread = f" (range {s['spread']:.1f})" if s["spread"] is not None else ""
            lines.append(
                f"| {model} | {s['structures'] or '-'} | {task} | {s['seconds']:.1f}{spread} | "
                f"{s['seconds'] / base:.2f} | {s['rss']:,.0f} | {WHAT_IT_RANKS.get(task, '')} |"
            )
        checks += _form_and_memory_checks(model, summary)
        floor, sosp_i = summary.get((model, "sosp-i-floor")), summary.get((model, "sosp-i"))
        if floor and sosp_i and floor["seconds"] and sosp_i["seconds"]:
            ratio = sosp_i["seconds"] / floor["seconds"]
            checks.append(
                f"- {model}: SOSP-I / its floor = **{ratio:.2f}** "
                + (
                    "(at least 1, as the floor's construction requires)"
                    if ratio >= 1
                    else "(below 1: timing noise exceeded the products' cost; rerun with more rounds)"
                )
            )
    if checks:
        lines += ["", "Checks in this run:", ""] + checks
    stages = [
        f"- {model} {task}: "
        + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in summary[(model, task)]["stages"].items())
        + (f"; {summary[(model, task)]['form']}" if summary[(model, task)].get("form") else "")
        for model in spec["models"]
        for task in spec["tasks"].split(",")
        if task.startswith("analysis-") and summary.get((model, task), {}).get("stages")
    ]
    if stages:
        lines += [
            "",
            "Where each whole call went (seconds per stage, medians; `run_analysis`'s own timings):",
            "",
        ]
        lines += stages
    return "\n".join(lines)


OWN_SCRIPTS = {
    "deployment": "deployment.py",
    "narrow-convs": "narrow_convs.py",
}  # sections a script writes itself


def run_own_script(name: str, threads: int) -> None:
    """A section whose script measures and writes it, in its own process."""
    script = ROOT / "bench" / OWN_SCRIPTS[name]
    subprocess.run([sys.executable, str(script), "--threads", str(threads)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(list(SECTIONS) + list(OWN_SCRIPTS)))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the saliency section")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help="the page to write into")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 at N' = 20 only: checks the pipeline")
    args = parser.parse_args()
    if args.quick:
        for spec in SECTIONS.values():
            spec.update(models=["resnet20"], samples=20, input="3,32,32", classes=10, batch_size=10)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the spawned measuring processes read it at start
    for name in args.only.split(","):
        if name in OWN_SCRIPTS:
            run_own_script(name, args.threads)
            continue
        rounds = args.rounds if name == "saliency" else 1
        markdown = run_saliency_section(name, rounds, args.threads)
        replace_section(name, markdown, Path(args.docs))
        print(f"wrote the {name} section of docs/benchmarks.md", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
