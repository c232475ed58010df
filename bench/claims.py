"""docs/claims.md from a stored study: does SOSP beat the baselines on this data, at equal parameters?

    python -m sosp_engine --threads 2 study submit --model resnet20:widths=8,16,32 --data digits \
        --methods sosp-i,sosp-h,first-order,magnitude,random --targets 0.2,0.5,0.8 --seeds 0,1,2 \
        --epochs 15 --finetune-epochs 3 --samples 500 --name claims
    python -m sosp_engine study export ID --out bench/results/claims.json
    python -m sosp_engine --threads 1 study submit ... (the same) --seeds 3,4,5,6 --name claims-more
    python -m sosp_engine study export ID3 --out bench/results/claims-seeds3-6.json
    python -m sosp_engine --threads 2 study expand --model resnet20:widths=8,16,32 --data digits \
        --procedures train-prune,expand-prune,widen-prune,init-prune --trials 3 --method sosp-h --ratio 0.8 \
        --unit params --epochs 15 --finetune-epochs 3 --samples 500 --name claims-expand
    python -m sosp_engine study export ID2 --out bench/results/claims-expand.json
    python bench/bottleneck_stability.py ID2 --workspace WS --out bench/results/bottleneck-stability.json
    python bench/claims.py bench/results/claims.json --more bench/results/claims-seeds3-6.json \
        --expand bench/results/claims-expand.json \
        --stability bench/results/bottleneck-stability.json

A claim is "reproduced" at a target when SOSP's mean is above the baseline's by more than the two standard deviations
added (the error bars do not overlap), "contradicted" when the baseline is above by that margin, else "not
distinguishable on this data".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sosp_engine.experiments.expand_study import expand_table, unpruned_reference  # noqa: E402
from sosp_engine.experiments.studies import aggregate  # noqa: E402

SOSP = ("sosp-i", "sosp-h")
DOC = ROOT / "docs" / "claims.md"


def verdict(a_mean: float, a_std: float, b_mean: float, b_std: float) -> str:
    margin = a_std + b_std
    if a_mean - b_mean > margin:
        return "reproduced"
    if b_mean - a_mean > margin:
        return "contradicted"
    return "not distinguishable"


def table_verdict(table, metric: str, sosp: str, base: str, target: float) -> tuple[str, object, object]:
    """The verdict of `sosp` against `base` at `target` on an aggregate table, with the two rows compared."""
    a = table[(table.method == sosp) & (table.target == target)].iloc[0]
    b = table[(table.method == base) & (table.target == target)].iloc[0]
    return verdict(a[f"{metric}_mean"], a[f"{metric}_std"], b[f"{metric}_mean"], b[f"{metric}_std"]), a, b


def claim_rows(table, metric: str, first: object | None = None) -> list[str]:
    """One row per comparison and target on every seed; with `first` (the aggregate of the first seeds alone), a
    verdict that differs between the two seed sets is marked unstable."""
    rows = []
    methods = list(dict.fromkeys(table.method))
    for sosp in [m for m in SOSP if m in methods]:
        for base in [m for m in methods if m not in SOSP]:
            for target in sorted(set(table.target)):
                said, a, b = table_verdict(table, metric, sosp, base, target)
                row = (
                    f"| {sosp} vs {base} | {target:.0%} | {a[f'{metric}_mean']:.1%} +- {a[f'{metric}_std']:.1%} | "
                    f"{b[f'{metric}_mean']:.1%} +- {b[f'{metric}_std']:.1%} | {said} |"
                )
                if first is not None:
                    earlier = table_verdict(first, metric, sosp, base, target)[0]
                    row += f" {earlier} | {'yes' if earlier == said else '**unstable**'} |"
                rows.append(row)
    return rows


def claim_header(first_seeds: list[int], first: object | None) -> list[str]:
    """The claims table's header: with a second seed set, the first set's verdict and whether it held."""
    if first is None:
        return ["| comparison | target | SOSP | baseline | verdict |", "| --- | ---: | ---: | ---: | --- |"]
    span = f"seeds {first_seeds[0]}-{first_seeds[-1]}"
    return [
        f"| comparison | target | SOSP (all seeds) | baseline (all seeds) | verdict (all seeds) | verdict ({span}) "
        "| stable |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]


def expand_rows(table, a: str, b: str) -> list[str]:
    """One row comparing procedure `a` with `b` at the matched size: accuracies, params and MACs, the verdict."""
    if a not in set(table.procedure) or b not in set(table.procedure):
        return []
    x, y = (table[table.procedure == p].iloc[0] for p in (a, b))
    return [
        f"| {a} vs {b} | {x.test_acc_mean:.1%} +- {x.test_acc_std:.1%} | {y.test_acc_mean:.1%} +- "
        f"{y.test_acc_std:.1%} | {x.params_mean:,.0f} / {y.params_mean:,.0f} | {x.macs_mean / 1e6:.2f} M / "
        f"{y.macs_mean / 1e6:.2f} M | {verdict(x.test_acc_mean, x.test_acc_std, y.test_acc_mean, y.test_acc_std)} |"
    ]


def expand_section(path: str) -> list[str]:
    """Claims 3 and 4 from an exported expand study: init- vs train-pruning, expand- vs widen- vs train-pruning."""
    study = json.loads(Path(path).read_text())
    config, plan, runs = study["config"], study["plan"], study["runs"]
    table = expand_table(runs)
    unpruned = unpruned_reference(runs, plan)
    init = expand_rows(table, "train-prune", "init-prune")
    if init:  # the paper's claim is that init-pruning is about as good: only a clear loss contradicts it
        init = [
            row.replace("| reproduced |", "| train-pruning ahead |")
            .replace("| not distinguishable |", "| reproduced (as good) |")
            .replace("| contradicted |", "| init-pruning ahead |")
            for row in init
        ]
    after = table.acc_after_pruning_mean.dropna()
    header = (
        "| comparison | first | second | params | MACs | verdict |\n| --- | ---: | ---: | ---: | ---: | --- |"
    )
    return [
        f"Study {study['study']} (`python bench/claims.py ... --expand {path}`): model `{config['model_spec']}` on "
        f"`{config['data_spec']}`, {config['trials']} trials per procedure (seeds 0-{config['trials'] - 1}), "
        f"{config['method']} at {config['ratio']:.0%} of {config['unit']} on the trained plain net, which sets the size "
        f"every run is pruned to ({plan['target_params']:,} of {plan['plain_params']:,} parameters); {config['epochs']} "
        f"training and {config['finetune_epochs']} fine-tuning epochs, init-pruning trains {config['epochs'] + config['finetune_epochs']} "
        f"epochs after pruning. Bottlenecks widened (from trial 0's trained net): "
        f"{', '.join(f'{u} x{f:g}' for u, f in plan['widen'].items())}. The unpruned plain net reaches "
        f"{unpruned['test_acc']:.1%} ({plan['plain_macs'] / 1e6:.2f} M MACs).",
        "",
        "## Claim 3: pruning at initialisation almost matches pruning after training (equal total epochs)",
        "",
        "Reproduced when train-pruning is not ahead by more than both standard deviations added.",
        "",
        header,
        *init,
        "",
        "## Claim 4: expand-pruning beats widen- and train-pruning at equal parameters",
        "",
        "Reproduced when expand-pruning's mean is above by more than both standard deviations added. The MACs column "
        "shows what each costs at inference: equal parameters are not equal MACs.",
        "",
        header,
        *expand_rows(table, "expand-prune", "widen-prune"),
        *expand_rows(table, "expand-prune", "train-prune"),
        "",
        f"Right after pruning (before fine-tuning) the pruned runs score {after.min():.1%}-{after.max():.1%}: the "
        f"final accuracies measure how far each net recovers in {config['finetune_epochs']} fine-tuning epochs "
        f"(init-pruning: {config['epochs'] + config['finetune_epochs']} epochs of training in its pruned shape).",
        "",
        "```",
        table.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        "```",
        "",
    ]


def stability_section(path: str) -> list[str]:
    """Claim 5 from bench/bottleneck_stability.py: the flagged bottlenecks across seeds and across N'."""
    data = json.loads(Path(path).read_text())
    trials = Counter(", ".join(r["bottlenecks"]) for r in data["across_trials"])
    draws = data["across_samples"]
    stages = list(draws[0]["stage_ratios"])
    rows = []
    for samples in sorted({d["samples"] for d in draws}):
        same = [d for d in draws if d["samples"] == samples]
        picked = Counter(", ".join(d["bottlenecks"]) for d in same)
        ranges = [
            f"{min(d['stage_ratios'][u] for d in same):.0%}-{max(d['stage_ratios'][u] for d in same):.0%}"
            for u in stages
        ]
        rows.append(
            f"| {samples} | "
            + "; ".join(f"{name} ({n}x)" for name, n in picked.most_common())
            + " | "
            + " | ".join(ranges)
            + " |"
        )
    majority, count = Counter(", ".join(d["bottlenecks"]) for d in draws).most_common(1)[0]
    return [
        "## Claim 5: the bottlenecks SOSP flags are a property of the net, not of the seed or of N'",
        "",
        f"From `{path}` ({data['method']} at {data['ratio']:.0%} of {data['unit']}, the paper's rule: the least pruned "
        f"stage of a ResNet). Across the {len(data['across_trials'])} independently trained plain nets: "
        + "; ".join(f"{name} ({n}x)" for name, n in trials.most_common())
        + f". On trial 0's trained net, per N' over {len({d['seed'] for d in draws})} draws of the samples:",
        "",
        "| N' | flagged (times) | " + " | ".join(f"{u} pruned" for u in stages) + " |",
        "| ---: | --- |" + " ---: |" * len(stages),
        *rows,
        "",
        f"Verdict: {count} of {len(draws)} analyses flag {majority}; "
        + ("stable across N' and draws." if count == len(draws) else "not fully stable: see the rows above.")
        + (
            " Stable across trained seeds."
            if len(trials) == 1
            else " Different trained seeds flag different units."
        ),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="docs/claims.md from stored studies")
    parser.add_argument("methods", help="an exported method study (JSON)")
    parser.add_argument(
        "--expand", default=None, help="an exported expand study (JSON) with train- and init-prune"
    )
    parser.add_argument("--stability", default=None, help="the JSON of bench/bottleneck_stability.py")
    parser.add_argument(
        "--more",
        nargs="*",
        default=[],
        help="exported method studies of the same setup with further seeds: their cells join the first's, and a "
        "verdict that differs from the first study's seeds alone is marked unstable",
    )
    args = parser.parse_args()
    path = args.methods
    study = json.loads(Path(path).read_text())
    config = study["config"]
    first_seeds = sorted(config["seeds"])
    cells, more_ids = list(study["cells"]), []
    for more in args.more:
        extra = json.loads(Path(more).read_text())
        more_ids.append(extra["study"])
        shared = (set(extra["config"]) & set(config)) - {"seeds"}  # a later version may add settings
        same = all(extra["config"][k] == config[k] for k in shared)
        if not same or set(extra["config"]["seeds"]) & set(first_seeds):
            raise SystemExit(f"{more} is not the same setup with other seeds")
        cells += extra["cells"]
    table = aggregate(cells)
    first = aggregate(study["cells"]) if args.more else None
    seeds = len({c["seed"] for c in cells})
    lines = [
        "# The paper's claims on this machine",
        "",
        f"Generated by `python bench/claims.py {' '.join(sys.argv[1:])}` from method {'studies' if args.more else 'study'} {', '.join([study['study']] + more_ids)}: model `{config['model_spec']}` on "
        f"`{config['data_spec']}`, methods {', '.join(config['methods'])}, targets {config['targets']} of "
        f"{config['unit']}, {seeds} seeds ({', '.join(map(str, sorted({c['seed'] for c in cells})))}; one trained "
        f"net each, {config['epochs']} epochs), N' = {config['samples']}, "
        f"{config['finetune_epochs']} fine-tuning epochs. The commands that regenerate it are in `bench/claims.py`.",
        "",
        "Verdict per target: reproduced when SOSP's mean exceeds the baseline's by more than both standard "
        "deviations added, contradicted when the baseline's exceeds SOSP's by that margin, else not distinguishable "
        "on this data. With more seeds than the first study's, a verdict that differs between the first seeds and all "
        "seeds is marked unstable: single-seed noise could flip it.",
        "",
        "## Claim 1: SOSP prunes with less damage than the baselines (accuracy right after pruning)",
        "",
        *claim_header(first_seeds, first),
        *claim_rows(table, "acc_pruned", first),
        "",
        "## Claim 2: after fine-tuning, SOSP's masks stay ahead",
        "",
        *claim_header(first_seeds, first),
        *claim_rows(table, "acc_finetuned", first),
        "",
        *(expand_section(args.expand) if args.expand else []),
        *(stability_section(args.stability) if args.stability else []),
        "## On CIFAR and a GPU",
        "",
        "The same studies run unchanged on `cifar10:PATH` and on a GPU. The paper's ResNet-56 settings: "
        "`study submit --model resnet56 --data cifar10:PATH --epochs 200 --finetune-epochs 200 --samples 1000 "
        "--targets 0.3,0.5,0.7` and `study expand --model resnet56 --data cifar10:PATH --epochs 200 --finetune-epochs "
        "200 --samples 1000 --ratio 0.5 --trials 3 --procedures train-prune,expand-prune,widen-prune,init-prune` "
        "(the same with `--model vgg19`, whose five least pruned layers are widened).",
        "",
        "## The method study's aggregate",
        "",
        "CPU latency (batch 1, ms) was measured while other work shared the 2 "
        "cores: read it as a rough figure, not a comparison.",
        "",
        "```",
        table.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        "```",
    ]
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
