"""Conformance matrix over real model zoos: structures, SOSP-H / SOSP-I, physical pruning, exact counts, exactness and
the pruned-checkpoint round trip, per model, each in its own process with a time limit.

    python bench/model_matrix.py                 # every torchvision classification model + the timm list, -> docs/models.md
    python bench/model_matrix.py --only timm:convnext_atto torchvision:regnet_x_400mf   # checked again
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TIMM_MODELS = (
    "resnext26ts",
    "regnetx_002",
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "convnext_atto",
    "ghostnet_050",
    "densenet121",
    "dla34",
    "dpn48b",
    "rexnet_100",
    "res2net50_14w_8s",
    "skresnet18",
    "seresnet18",
    "cspresnet50",
    "hrnet_w18_small",
    "nf_regnet_b0",
    "mixnet_s",
    "resnest14d",
    "repvgg_a0",
    "cspdarknet53",
    "cs3darknet_s",
    "ghostnetv2_100",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mobilevit_xs",
    "efficientformer_l1",
    "convnextv2_atto",
    "poolformer_s12",
    "levit_128s",
    "coatnet_0_rw_224",
    "regnety_002",
)
RESULTS = ROOT / "bench" / "results" / "model_matrix.jsonl"
DOC = ROOT / "docs" / "models.md"


def torchvision_specs() -> list[str]:
    import torchvision

    classifiers = torchvision.models.list_models(module=torchvision.models)
    segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
    return [f"torchvision:{n}" for n in sorted(classifiers) + sorted(segmentation)]


def check_model(spec: str, side: int = 64, samples: int = 8, memory_budget_gb: float | None = None) -> dict:
    """Every conformance check on one model spec; raises at the first stage that fails (the stage is recorded).

    The analyses take the largest batch up to `samples` that `memory_budget_gb` allows, as `analyze` does."""
    import torch

    from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis
    from sosp_engine.pruning.counting import count_macs, count_params
    from sosp_engine.errors import AnalysisError
    from sosp_engine.pruning.exactness import output_deviation
    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench
    from sosp_engine.pruning.masks import mask_summary, pruned_copy
    from sosp_engine.pruning.channel_trace import forget_traces
    from sosp_engine.pruning.offered import find_structures
    from sosp_engine.pruning.pruned_models import pruning_recipe, save_pruned

    torch.manual_seed(0)
    row: dict = {"model": spec, "stage": "structures"}
    data = f"synthetic:3,{side},{side}:10"
    wb = open_workbench(ModelSetup(spec, data))
    wb.model.eval()
    if revived := live_output_layers(wb.model):
        row["zero_layers_reinitialised"] = revived
    forget_traces()  # the workbench traced this architecture already: time a trace from scratch
    start = time.perf_counter()
    s = find_structures(wb.model, wb.example)
    row["trace_s"] = round(time.perf_counter() - start, 2)
    account = s.channel_account()
    unaccounted = [
        r["module"] for r in account if r["offered"] + r["unprunable"] + r["excluded"] != r["width"]
    ]
    if unaccounted:
        raise AssertionError(f"channels neither offered, unprunable nor excluded in {unaccounted[:3]}")
    row.update(
        params=s.counts()[0],
        macs=s.counts()[1],
        layers=len(s.layers),
        structures=s.num_structures,
        grouped_layers=sum(l.structure_size > 1 for l in s.layers),
        unprunable=len(s.unprunable),
        heads=sum(len(h) for h in s.heads.values()),
        channels=sum(r["width"] for r in account),
        channels_offered=sum(r["offered"] for r in account),
        input=side,
    )
    results = {}
    for method in ("sosp-i", "sosp-h"):  # SOSP-I first: the process's peak RSS after it is SOSP-I's own
        row["stage"] = method
        start = time.perf_counter()
        try:
            results[method] = run_analysis(
                wb,
                AnalysisConfig(
                    method=method,
                    samples=samples,
                    batch_size=samples,
                    memory_budget_gb=memory_budget_gb,
                    setup=ModelSetup(device="cpu"),
                ),
            )
        except AnalysisError as exc:
            if method != "sosp-i" or not any(
                k in str(exc)
                for k in ("S x S matrix", "R x S factor", "Euler's theorem", "shared by the whole")
            ):
                raise
            row["sosp_i_refused"] = str(exc).split(". ")[
                0
            ]  # a specified clear refusal; every other check still runs
            continue
        row[f"{method}_s"] = round(time.perf_counter() - start, 2)
        row[f"{method}_batch"] = results[method].config.batch_size
        if method == "sosp-i":
            row["sosp-i_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            row["sosp-i_form"] = (
                results[method].curvature_form.split(" (")[0].removeprefix("Gauss-Newton matrix kept as ")
            )
    result = results["sosp-h"]
    approximate = result.exactness["approximate_layers"]
    row["approximate_layers"] = len(approximate)
    x, _ = wb.data.analysis_samples(4)
    deviations = []
    for ratio in (0.3, 0.7):
        row["stage"] = f"prune {ratio:.0%}"
        mask = result.mask(s, min(ratio, result.max_ratio))
        smaller = pruned_copy(wb.model, s, mask, wb.example).eval()
        summary = mask_summary(s, mask)
        counted = (count_params(smaller), count_macs(smaller, wb.example))
        if (summary["params_after"], summary["macs_after"]) != counted:
            raise AssertionError(
                f"counts differ at {ratio:.0%}: predicted {summary['params_after']}/"
                f"{summary['macs_after']}, counted {counted[0]}/{counted[1]}"
            )
        deviation = output_deviation(wb.model, s, mask, wb.example, x)
        if not approximate and deviation > 1e-4:
            raise AssertionError(
                f"pruned differs from zero-masked by {deviation:.2e} at {ratio:.0%} in an exact net"
            )
        deviations.append(deviation)
        if ratio == 0.7:
            row["stage"] = "reopen"
            with tempfile.TemporaryDirectory() as tmp:
                path = save_pruned(Path(tmp) / "pruned.pt", smaller, pruning_recipe(spec, s, mask, None, []))
                reopened = open_workbench(ModelSetup(spec, data, str(path), preset=None)).model.eval()
                with torch.no_grad():
                    if not torch.allclose(reopened(x), smaller(x), atol=1e-5):
                        raise AssertionError("the reopened pruned checkpoint computes another function")
    row.update(deviation=max(deviations), stage="all", status="ok")
    return row


def live_output_layers(model) -> list[str]:
    """Re-initialise (PyTorch's default) every all-zero linear or conv layer, and name them.

    torchvision initialises ViT heads to zero: the logits are then constant at random init, every saliency is zero,
    and the analyses rightly refuse. The matrix checks the machinery, so it gives such a head a random init."""
    from sosp_engine.nets import zero_layers

    revived = zero_layers(model)
    for name in revived:
        model.get_submodule(name).reset_parameters()
    return revived


def measure_sosp_i(spec: str, side: int, samples: int = 8, memory_budget_gb: float | None = None) -> dict:
    """SOSP-I alone on one model, as `check_model` runs it: its seconds (to the exactness check), batch, the process's
    peak RSS and the form it kept (for rows whose other checks stand and whose SOSP-I was refused before)."""
    import torch

    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench
    from sosp_engine.errors import MaskError
    from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis

    torch.manual_seed(0)
    wb = open_workbench(ModelSetup(spec, f"synthetic:3,{side},{side}:10"))
    wb.model.eval()
    revived = live_output_layers(wb.model)
    config = AnalysisConfig(
        method="sosp-i",
        samples=samples,
        batch_size=samples,
        memory_budget_gb=memory_budget_gb,
        setup=ModelSetup(device="cpu"),
    )
    ranked: dict = {}

    def progress(fraction: float, message: str) -> None:
        if "exactness" in message and "at" not in ranked:  # the terms and the selection are done
            ranked["at"] = time.perf_counter()

    start = time.perf_counter()
    row: dict = {"sosp-i_measured": time.strftime("%Y-%m-%d")}
    if revived:
        row["zero_layers_reinitialised"] = revived
    try:
        result = run_analysis(wb, config, progress)
    except MaskError as exc:  # physical pruning of the exactness check's mask failed; SOSP-I itself had run
        row["sosp_i_error"] = f"its exactness check: {str(exc).splitlines()[0][:160]}"
    else:
        row["sosp-i_batch"] = result.config.batch_size
        row["sosp-i_form"] = result.curvature_form.split(" (")[0].removeprefix("Gauss-Newton matrix kept as ")
    row["sosp-i_s"] = round(ranked.get("at", time.perf_counter()) - start, 2)
    row["sosp-i_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def _sosp_i_child(spec: str, side: int, memory_budget_gb: float, queue) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        queue.put(measure_sosp_i(spec, side, memory_budget_gb=memory_budget_gb))
    except BaseException as exc:
        queue.put({"sosp_i_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})


def remeasure_sosp_i(row: dict, timeout: float, memory_budget_gb: float) -> dict:
    """The row with SOSP-I measured anew in a fresh process (its refusal dropped if it ran); other columns stand."""
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(
        target=_sosp_i_child, args=(row["model"], row.get("input", 64), memory_budget_gb, queue)
    )
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {**row, "sosp_i_error": f"SOSP-I over {timeout:.0f} s"}
    measured = queue.get() if not queue.empty() else {"sosp_i_error": f"exit code {proc.exitcode}"}
    stale = ("sosp_i_refused", "sosp_i_error", "sosp-i_form", "sosp-i_batch")
    return {**{k: v for k, v in row.items() if k not in stale}, **measured}


def _child(spec: str, side: int, memory_budget_gb: float, queue) -> None:
    import torch

    torch.set_num_threads(1)  # the matrix's timings are one-thread figures
    try:
        queue.put(check_model(spec, side, memory_budget_gb=memory_budget_gb))
    except BaseException as exc:
        queue.put(
            {
                "model": spec,
                "status": "failed",
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "trace": traceback.format_exc()[-600:],
            }
        )


def run_isolated(spec: str, timeout: float, memory_budget_gb: float) -> dict:
    """check_model in a fresh process; models that need 224x224 inputs (ViT-style) are retried at that size."""
    row: dict = {}
    for side in (64, 224):
        queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_child, args=(spec, side, memory_budget_gb, queue))
        start = time.time()
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            return {
                "model": spec,
                "status": "timeout",
                "error": f"over {timeout:.0f} s on this CPU (input {side}x{side})",
            }
        row = (
            queue.get()
            if not queue.empty()
            else {"model": spec, "status": "failed", "error": f"process ended with code {proc.exitcode}"}
        )
        row["wall_s"] = round(time.time() - start, 1)
        if row["status"] == "ok" or "input" in row or side == 224:
            return row
        if not any(word in row.get("error", "").lower() for word in ("shape", "size", "height", "width")):
            return row
    return row


def _machine() -> str:
    import timm
    import torch
    import torchvision

    return (
        f"{os.cpu_count()}-core CPU, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"timm {timm.__version__}"
    )


def _kept_parts(doc: Path) -> tuple[str, str]:
    """The note paragraphs and the sections after the table (`## ...`) of the document as it stands."""
    if not doc.exists():
        return "", ""
    text = doc.read_text()
    head, _, rest = text.partition("\n**")
    paragraphs = head.split("\n\n")[2:]  # after the title and the generated line
    sections = rest[rest.find("\n## ") :] if "\n## " in rest else ""
    return "\n\n".join(p.strip() for p in paragraphs if p.strip()), sections.strip()


def _share(row: dict) -> str:
    """Channels offered of all conv / linear output channels (rows measured before the channel account: blank)."""
    if "channels" not in row:
        return ""
    return f"{row['channels_offered']:,} / {row['channels']:,}"


def _thousands(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def write_doc(rows: list[dict], doc: Path = DOC, note: str = "") -> None:
    """The table of every row; a note given replaces the standing one, and the sections after the table stay."""
    standing_note, sections = _kept_parts(doc)
    note = note or standing_note
    ok = sum(r["status"] == "ok" and "sosp_i_refused" not in r and "sosp_i_error" not in r for r in rows)
    refused = sum(r["status"] == "ok" and "sosp_i_refused" in r for r in rows)
    failed = sum(r["status"] == "ok" and "sosp_i_error" in r for r in rows)
    ran = sum(r["status"] != "not run yet" for r in rows)
    lines = [
        "# Model conformance matrix",
        "",
        f"Generated by `python bench/model_matrix.py` ({time.strftime('%Y-%m-%d')}, {_machine()}, one thread per model, "
        "random init, synthetic 3x64x64 input (224 where the model needs it), N' = 8). Per model: prunable "
        "structures found, SOSP-H and SOSP-I run, physical pruning at 30 % and 70 % of the structures (SOSP-H order), "
        "predicted parameters / MACs equal to counting the pruned model, pruned output equal to the zero-masked one "
        "(relative deviation < 1e-4) unless the analysis lists approximate layers, and the pruned checkpoint reopens "
        "with the same function.",
        "",
        *([note, ""] if note else []),
        f"**{ok} of the {ran} models checked so far pass every check**; {refused} more pass every other check with "
        f"SOSP-I refused (for memory, or naming a producer the whole batch shares), and {failed} pass every check "
        "but SOSP-I's (each with its reason in the row; "
        f"{len(rows) - ran} of the matrix not run yet: the script resumes where it stopped).",
        "",
        "| model | params | layers | structures | heads | channels offered | grouped layers | unprunable | trace s "
        "| SOSP-H s | SOSP-I s | SOSP-I peak RSS (MB) | SOSP-I kept H_GN as | approximate layers | max deviation "
        "| status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}".replace("|", "/")
        if r["status"] == "ok" and "sosp_i_refused" in r:
            status = f"ok, SOSP-I refused: {r['sosp_i_refused']}"
        if r["status"] == "ok" and "sosp_i_error" in r:
            status = f"ok except SOSP-I: {r['sosp_i_error']}".replace("|", "/")
        dev = f"{r['deviation']:.1e}" if "deviation" in r else ""
        lines.append(
            f"| {r['model']} | {r.get('params', ''):,} | {r.get('layers', '')} | {r.get('structures', '')} | "
            f"{r.get('heads', '')} | {_share(r)} | {r.get('grouped_layers', '')} | {r.get('unprunable', '')} | "
            f"{r.get('trace_s', '')} | {r.get('sosp-h_s', '')} | "
            f"{r.get('sosp-i_s', '')} | {_thousands(r.get('sosp-i_peak_rss_mb'))} | {r.get('sosp-i_form', '')} | "
            f"{r.get('approximate_layers', '')} | {dev} | {status} |"
            if "params" in r
            else f"| {r['model']} |{'  |' * 15} {status} |"
        )
    doc.write_text("\n".join(lines) + ("\n\n" + sections if sections else "") + "\n")


def main() -> None:
    import torch

    from sosp_engine.saliency.memory import default_budget

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="model specs to check (default: the whole matrix)"
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per model")
    parser.add_argument("--workers", type=int, default=1, help="models checked at once, one thread each")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="JSON-lines file of the rows (resumed from)"
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="the markdown table written at the end")
    parser.add_argument(
        "--note", default="", help="a paragraph for the document (e.g. where the rows were measured)"
    )
    parser.add_argument(
        "--sosp-i-only",
        action="store_true",
        help="measure SOSP-I alone on the --only models that already have a row; their other columns stand",
    )
    args = parser.parse_args()
    matrix = torchvision_specs() + [f"timm:{n}" for n in TIMM_MODELS]
    specs = args.only or matrix
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.results.exists():
        done = {r["model"]: r for r in map(json.loads, args.results.read_text().splitlines())}
    lock = threading.Lock()
    budget_gb = (
        default_budget(torch.device("cpu")) / 2**30 / max(1, args.workers)
    )  # the free RAM's share, per worker

    def check(spec: str) -> None:
        if args.sosp_i_only:
            row = remeasure_sosp_i(done[spec], args.timeout, budget_gb)
        else:
            row = run_isolated(spec, args.timeout, budget_gb)
        with lock:
            print(f"{spec}: {row['status']} {row.get('error', '')} ({row.get('wall_s', '')} s)", flush=True)
            done[spec] = row
            with args.results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        list(
            pool.map(
                check,
                [
                    s
                    for s in specs
                    if args.only or done.get(s, {}).get("status", "not run yet") == "not run yet"
                ],
            )
        )
    write_doc(
        [
            done.get(
                s, {"model": s, "status": "not run yet", "error": "left for a longer run of this script"}
            )
            for s in matrix + [s for s in done if s not in matrix]
        ],
        args.doc,
        args.note,
    )


if __name__ == "__main__":
    main()
