"""What pruning buys at deployment: latency drop / MAC drop (the efficiency) in PyTorch eager and ONNX Runtime, for
ResNet-56 (batch 1, 64) and ResNet-50 (batch 1, 32), with and without the latency-aware order and rounding to 8.

    python bench/deployment.py [--threads 1] [--quick] [--no-docs] [--render RESULTS.jsonl]

One process, warm, `--threads` torch threads (ONNX Runtime gets as many intra-op threads). Each pruned net is timed
alternately with the unpruned net in the same runtime (medians; spread = median absolute deviation), so a change of
the machine's load hits both alike. Latency-aware orders (`--normalize latency`) are made in the runtime and at the
batch they are timed in. Rows go to bench/results/deployment-DATE.jsonl; the tables replace the "deployment" section
of docs/benchmarks.md. `--quick`: ResNet-20 at 16x16, batches 1 and 8 (checks the pipeline in about a minute).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import provenance, provenance_line, publish, replace_section  # noqa: E402

SETUPS = [
    dict(net="ResNet-56, 32x32", model="resnet56", data="synthetic:3,32,32:10", samples=128, batches=[1, 64]),
    dict(
        net="ResNet-50, 224x224",
        model="torchvision:resnet50",
        data="synthetic:3,224,224:1000",
        samples=32,
        batches=[1, 32],
    ),
]
QUICK = [
    dict(net="ResNet-20, 16x16", model="resnet20", data="synthetic:3,16,16:10", samples=32, batches=[1, 8])
]
RATIOS = [0.5, 0.75]  # of all structures
ROUND_TO = 8
PROVENANCE_KEYS = (
    "commit",
    "date",
    "load_average",
    "load_average_end",
    "cpus",
    "cpu",
    "threads",
    "torch",
    "layout",
    "whole_call",
)
GOAL = 0.8  # the aim: latency drop >= 0.8 x MAC drop at the larger batch in the deployment runtime


def repeats(model: str, batch: int) -> int:
    if batch == 1:
        return 30 if "resnet50" not in model else 10
    return 10 if "resnet50" not in model else 5


def measure(setup: dict, threads: int) -> pd.DataFrame:
    """Every row of one net: plain and latency-aware SOSP-H orders, each as analysed and rounded, in each runtime."""
    import torch

    from sosp_engine.latency.deployment import DeploymentGrid, efficiency_table, order_variants
    from sosp_engine.latency.runtimes import RUNTIMES
    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench
    from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis

    torch.manual_seed(0)
    wb = open_workbench(ModelSetup(setup["model"], setup["data"]))

    def analysis(**latency):
        config = AnalysisConfig(
            method="sosp-h",
            samples=setup["samples"],
            batch_size=setup["samples"],
            latency_device="cpu",
            **latency,
            setup=ModelSetup(device="cpu"),
        )
        return run_analysis(wb, config)

    def timed(result, kind: str, runtimes: list[str], batch: int) -> pd.DataFrame:
        grid = DeploymentGrid(runtimes, [batch], repeats=repeats(setup["model"], batch), ratios=RATIOS)
        table = efficiency_table(wb, order_variants(result, wb.structures, [ROUND_TO]), grid)
        table.insert(0, "order_kind", kind)
        print(table.to_string(index=False), file=sys.stderr, flush=True)
        return table

    plain = analysis()
    tables = [timed(plain, "SOSP-H", list(RUNTIMES), b) for b in setup["batches"]]
    for runtime in RUNTIMES:
        for batch in setup["batches"]:
            aware = analysis(normalize="latency", latency_runtime=runtime, latency_batch=batch)
            tables.append(timed(aware, "SOSP-H, latency-aware", [runtime], batch))
    table = pd.concat(tables, ignore_index=True)
    table.insert(0, "net", setup["net"])
    table["ratio"] = table["structures_pruned"] / wb.structures.num_structures
    table["round_to"] = table["order"].map(lambda o: ROUND_TO if o.startswith("rounded") else 1)
    return table


def render(table: pd.DataFrame, run: dict) -> str:
    """The summary (efficiency per net, batch, runtime and order) and the full table, as markdown."""
    lines = [
        "## What pruning buys at deployment: efficiency per runtime (`python bench/deployment.py`)",
        "",
        provenance_line(run),
        "",
        "Efficiency = latency drop / MAC drop of the physically pruned net (1: every saved MAC is saved time). "
        f"Masks at {' and '.join(f'{r:.0%}' for r in RATIOS)} of the structures along the SOSP-H order, as analysed "
        f"and regrouped to multiples of {ROUND_TO} (`--round-to {ROUND_TO}`); the latency-aware order "
        "(`--normalize latency`) is made in the runtime and at the batch it is timed in. Each pruned net is timed "
        "alternately with the unpruned one in the same runtime. Cells: the efficiency at each ratio.",
        "",
    ]
    kinds = [(k, r) for k in ("SOSP-H", "SOSP-H, latency-aware") for r in (1, ROUND_TO)]
    header = "| net | batch | runtime | " + " | ".join(
        f"{k}{', rounded to 8' if r > 1 else ''}" for k, r in kinds
    )
    lines += [header + " |", "| --- | ---: | --- |" + " ---: |" * len(kinds)]
    for (net, batch, runtime), rows in table.groupby(["net", "batch", "runtime"], sort=False):
        cells = []
        for kind, round_to in kinds:
            chosen = rows[(rows["order_kind"] == kind) & (rows["round_to"] == round_to)].sort_values("ratio")
            cells.append(" / ".join(f"{v:.2f}" for v in chosen["efficiency"]) or "-")
        lines.append(f"| {net} | {batch} | {runtime} | " + " | ".join(cells) + " |")
    table = table.reset_index(drop=True)
    largest = table[table["batch"] == table.groupby("net")["batch"].transform("max")]
    best = largest.loc[largest.groupby(["net", "runtime"])["efficiency"].idxmax()]
    lines += ["", "At the larger batch, the best efficiency reached (the aim is at least 0.8):", ""]
    for _, r in best.iterrows():
        verdict = "reaches" if r["efficiency"] >= GOAL else "falls short of"
        lines.append(
            f"- {r['net']}, batch {r['batch']}, {r['runtime']}: **{r['efficiency']:.2f}** ({r['order_kind']}, "
            f"{r['order']}, {r['ratio']:.0%} of the structures: MAC drop {r['mac_drop']:.1%}, latency drop "
            f"{r['latency_drop']:.1%}, {r['pruned_ms']:.2f} / {r['unpruned_ms']:.2f} ms); {verdict} 0.8."
        )
    lines += [
        "",
        "<details><summary>Every measured point</summary>",
        "",
        "| net | batch | runtime | order | ratio | MAC drop | latency drop | efficiency | ms pruned / unpruned (spread) |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['net']} | {r['batch']} | {r['runtime']} | {r['order_kind']}, {r['order']} | {r['ratio']:.0%} | "
            f"{r['mac_drop']:.1%} | {r['latency_drop']:.1%} | {r['efficiency']:.2f} | {r['pruned_ms']:.2f} / "
            f"{r['unpruned_ms']:.2f} ({r['spread_ms']:.2f}) |"
        )
    lines += ["", "</details>"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="ResNet-20 at 16x16 only")
    parser.add_argument(
        "--no-docs", action="store_true", help="print the tables; leave docs/benchmarks.md as is"
    )
    parser.add_argument(
        "--render", default=None, help="render the docs section from a results file, measuring nothing"
    )
    args = parser.parse_args()
    if args.render:
        rows = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line.strip()]
        run = {key: rows[0][key] for key in PROVENANCE_KEYS if key in rows[0]}
        markdown = render(pd.DataFrame(rows), run)
        print(markdown)
        if not args.no_docs:
            replace_section("deployment", markdown)
        return
    import torch

    torch.set_num_threads(args.threads)
    run = provenance(
        args.threads, "one process, warm, pruned and unpruned nets interleaved", "whole inferences"
    )
    table = pd.concat(
        [measure(setup, args.threads) for setup in (QUICK if args.quick else SETUPS)], ignore_index=True
    )
    section = None if args.no_docs or args.quick else "deployment"
    out = publish(
        "deployment-quick" if args.quick else "deployment",
        section,
        table.to_dict("records"),
        run,
        lambda rows, run: render(pd.DataFrame(rows), run),
    )
    if section is not None:
        print(f"wrote the deployment section of docs/benchmarks.md and {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
