"""Architectural bottlenecks (paper sec. 3.4): layers or stages pruned markedly less than the rest of the network.

Rules (documented for the UI):
- `mean-std` (default): flag a unit whose pruning ratio is below mean - k * std of all units' ratios (k = 1 by default).
- `least`: flag the n least pruned units among those pruned less than the mean.
The score of a unit is (mean - ratio) / std: how many standard deviations it is pruned less than the mean over units.
"""

from __future__ import annotations

import pandas as pd
from ..progress import counted

RULES = ("mean-std", "least")
MEAN_NOTE = (
    "The mean is unweighted over the units, so it differs from the global ratio, which weighs them by their "
    "channels."
)
LEVELS = ("layer", "stage")


def unit_ratios(table: pd.DataFrame, level: str = "layer") -> pd.DataFrame:
    """Pruning ratio per layer, or per stage (pruned channels / channels of all its layers), in network order."""
    if level not in LEVELS:
        raise ValueError(f"unknown level '{level}'; use one of {LEVELS}")
    if level == "layer":
        out = table[["layer", "stage", "depth", "channels", "pruned", "pruning_ratio"]].rename(
            columns={"layer": "unit"}
        )
        return out.reset_index(drop=True)
    grouped = table.groupby("stage", sort=False).agg(
        depth=("depth", "min"),
        channels=("channels", "sum"),
        pruned=("pruned", "sum"),
        layers=("layer", "count"),
    )
    grouped = grouped.sort_values("depth").reset_index()
    grouped["pruning_ratio"] = grouped["pruned"] / grouped["channels"]
    grouped["unit"] = grouped["stage"]
    return grouped[["unit", "stage", "depth", "channels", "pruned", "pruning_ratio", "layers"]]


def find_bottlenecks(
    table: pd.DataFrame, level: str = "layer", rule: str = "mean-std", k: float = 1.0, n: int = 3
) -> tuple[pd.DataFrame, dict]:
    """Rank units by how much less they are pruned than the rest; flag them by `rule`. Returns (ranked table,
    rule info)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule '{rule}'; use one of {RULES}")
    units = unit_ratios(table, level)
    mean, std = float(units.pruning_ratio.mean()), float(units.pruning_ratio.std(ddof=0))
    units["network_mean"] = mean
    units["score"] = (mean - units.pruning_ratio) / std if std > 0 else 0.0
    threshold = mean - k * std
    if rule == "mean-std":
        units["flagged"] = units.pruning_ratio < threshold - 1e-12
    else:  # at most n, and never a unit pruned as much as the mean or more: that is no bottleneck
        below = units[units.pruning_ratio < mean - 1e-12]
        order = below.sort_values(["pruning_ratio", "depth"]).index[:n]
        units["flagged"] = units.index.isin(order)
        threshold = float(units.loc[order, "pruning_ratio"].max()) if len(order) else 0.0
    units = units.sort_values(["score", "depth"], ascending=[False, True]).reset_index(drop=True)
    units.insert(0, "rank", range(1, len(units) + 1))
    units["why"] = [
        f"pruned {r:.0%} vs {level} mean {mean:.0%}: {abs(s):.2f} std {'below' if s > 0 else 'above'} it"
        + (" -> bottleneck" if f else "")
        for r, s, f in zip(units.pruning_ratio, units.score, units.flagged)
    ]
    info = {"rule": rule, "level": level, "k": k, "n": n, "mean": mean, "std": std, "threshold": threshold}
    return units, info


def paper_level(model_spec: str) -> tuple[str, int]:
    """The paper's bottleneck choice for expand-pruning (sec. 3.4): the least pruned stage of a ResNet, else the five
    least pruned layers."""
    return ("stage", 1) if model_spec.split(":")[0].startswith("resnet") else ("layer", 5)


def widening_plan(
    model_spec: str,
    table: pd.DataFrame,
    level: str | None = None,
    picked: set[str] | None = None,
    factor: float = 2.0,
) -> pd.DataFrame:
    """Each unit of `level` (default: the paper's for the model) with its pruning ratio and the width factor
    expand-pruning gives it: `factor` for the `picked` units, or for the paper's choice (sec. 3.4) without a pick."""
    default_level, n = paper_level(model_spec)
    units, _ = find_bottlenecks(table, level or default_level, "least", n=n)
    flags = units.unit.isin(picked) if picked is not None else units.flagged
    return pd.DataFrame(
        {
            "unit": units.unit,
            "pruning_ratio": units.pruning_ratio,
            "factor": [factor if f else 1.0 for f in flags],
        }
    )


def paper_widening(model_spec: str, table: pd.DataFrame, factor: float = 2.0) -> dict[str, float]:
    """The units expand-pruning widens by the paper's choice on a layer table of the trained net, each by `factor`."""
    plan = widening_plan(model_spec, table, factor=factor)
    return {unit: f for unit, f in zip(plan.unit, plan.factor) if f != 1.0}


def explain(units: pd.DataFrame, info: dict) -> str:
    """A short plain-language explanation of the flags for the dashboard."""
    flagged = units[units.flagged]
    if flagged.empty:
        return (
            f"No {info['level']} is pruned markedly less than the rest (mean ratio over {info['level']}s "
            f"{info['mean']:.0%}, std {info['std']:.0%}); SOSP sees no architectural bottleneck at this ratio. "
            + MEAN_NOTE
        )
    names = ", ".join(f"'{u}'" for u in flagged.unit)
    rule = (
        f"pruning ratio below mean - {info['k']:g} x std = {info['threshold']:.0%}"
        if info["rule"] == "mean-std"
        else f"the {info['n']} least pruned {info['level']}s among those pruned less than the mean "
        f"{info['mean']:.0%}"
    )
    return (
        f"{counted(len(flagged), 'bottleneck ' + info['level'])}: {names}. Flag rule: {rule}. SOSP keeps their "
        "channels because removing them would raise the loss most: widening them (expand-pruning, x2) is the "
        "paper's remedy. " + MEAN_NOTE
    )
