"""How far a net can be pruned: along an analysis's order, the measured loss and accuracy of the zero-masked and the
physically pruned net at a grid of global ratios, next to the loss increase the analysis predicts for each mask."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..saliency.analysis import AnalysisResult, analysed_model
from .compare import rank_correlation
from ..devices import resolve_device
from ..errors import AnalysisError
from ..pruning.workbench import Workbench
from ..pruning.masks import pruned_copy, zeroed_copy
from ..nets import weights_fingerprint
from ..progress import ProgressFn, StopFn, check_cancel, report
from ..saliency.selection import UNITS
from ..pruning.structures import StructureSet
from .training import evaluate

COLUMNS = (
    "ratio",
    "unit",
    "pruned_structures",
    "params",
    "macs",
    "predicted_increase",
    "zeroed_loss",
    "zeroed_acc",
    "pruned_loss",
    "pruned_acc",
    "measured_increase",
)


@dataclass
class SensitivityCurve:
    """One row per grid ratio (COLUMNS), the unpruned net's loss and accuracy, and how well prediction ranks reality."""

    table: pd.DataFrame
    baseline_loss: float
    baseline_acc: float
    rank_correlation: (
        float  # Spearman's rho of predicted vs measured loss increase over the grid (nan: < 3 points)
    )
    method: str
    split: str
    samples: int

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "split": self.split,
            "samples": self.samples,
            "baseline_loss": self.baseline_loss,
            "baseline_acc": self.baseline_acc,
            "rank_correlation": None if math.isnan(self.rank_correlation) else self.rank_correlation,
            "points": self.table.to_dict(orient="records"),
        }


def even_grid(points: int, max_ratio: float, distinct: int | None = None) -> list[float]:
    """`points` ratios from 0 to just under `max_ratio`, evenly spaced; at most `distinct` (the number of different
    masks the order gives), since more points would only evaluate the same masks again."""
    if points < 2:
        raise AnalysisError(f"a sensitivity curve needs at least 2 points, got {points}")
    if distinct is not None and points > distinct:
        raise AnalysisError(
            f"{points:,} points asked for, but the pruning order gives only {distinct:,} different "
            f"masks: use --points {distinct} or fewer"
        )
    top = max(0.0, max_ratio - 1e-6)
    return [round(top * i / (points - 1), 6) for i in range(points)]


def max_reduction(result: AnalysisResult, structures: StructureSet, unit: str) -> float:
    """The largest ratio of `unit` the analysis's cap allows to prune."""
    if unit == "structures":
        return result.max_ratio
    column = UNITS.index(unit) - 1
    pruned = result.pruned_vector(result.n_prunable)
    return 1 - structures.counts(pruned)[column] / structures.counts()[column]


def distinct_masks(result: AnalysisResult) -> int:
    """How many different masks the stored order gives: each prefix length from none to every prunable structure."""
    return result.n_prunable + 1


def parse_grid(text: str) -> list[float]:
    """'0,0.1,0.5' -> sorted unique ratios in [0, 1)."""
    try:
        ratios = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise AnalysisError(
            f"the grid must be comma-separated numbers such as 0,0.2,0.4, got '{text}'"
        ) from None
    if not ratios or not all(0 <= r < 1 for r in ratios):
        raise AnalysisError(f"every grid ratio must be in [0, 1), got '{text}'")
    return ratios


def evaluated_model(result: AnalysisResult, workbench: Workbench, target: torch.device) -> nn.Module:
    """The net the analysis ran on, on `target`, refused when the workbench's weights are not the analysis's."""
    x, _ = workbench.data.analysis_samples(result.config.samples, result.config.seed)
    model = analysed_model(workbench, result.config, x, target)
    if weights_fingerprint(model) != result.weights_fingerprint:
        raise AnalysisError(
            "these weights are not the ones the analysis ran on: open the analysis with its own "
            f"checkpoint ({result.config.setup.weights or 'random init'})"
        )
    return model


@dataclass(frozen=True)
class Evaluation:
    """On what a net's loss and accuracy are measured: a split (its first `samples`, None: all), the batch, the
    device."""

    split: str = "val"
    samples: int | None = None
    batch_size: int = 256
    device: str = "auto"

    def loader(self, workbench: Workbench):
        return workbench.data.loader(self.split, self.batch_size, limit=self.samples)


def sensitivity_curve(
    result: AnalysisResult,
    workbench: Workbench,
    ratios: list[float],
    unit: str = "structures",
    evaluation: Evaluation = Evaluation(),
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> SensitivityCurve:
    """Evaluate the analysed net pruned to each ratio along the stored order: no saliency is recomputed."""
    if unit not in UNITS:
        raise AnalysisError(f"unknown unit '{unit}'; use one of {UNITS}")
    structures = workbench.structures
    result.check_structures(structures)
    if len(ratios) > distinct_masks(result):
        raise AnalysisError(
            f"{len(ratios):,} ratios asked for, but the pruning order gives only "
            f"{distinct_masks(result):,} different masks"
        )
    target = resolve_device(evaluation.device)
    model = evaluated_model(result, workbench, target)
    loader = evaluation.loader(workbench)
    count = len(loader.dataset)
    base_loss, base_acc = evaluate(model, loader, target, amp=False)
    example = workbench.example.to(target)
    rows = []
    for i, ratio in enumerate(ratios):
        check_cancel(should_stop)
        k = result.prefix(structures, ratio, unit)
        mask = {result.keys[s] for s in result.pruning_order[:k].tolist()}
        zeroed_loss, zeroed_acc = evaluate(zeroed_copy(model, structures, mask), loader, target, amp=False)
        pruned_loss, pruned_acc = evaluate(
            pruned_copy(model, structures, mask, example), loader, target, amp=False
        )
        params, macs = structures.counts(structures.pruned_vector(mask))
        predicted = result.predicted_increase(k)
        rows.append(
            (
                ratio,
                unit,
                k,
                params,
                macs,
                float("nan") if predicted is None else predicted,
                zeroed_loss,
                zeroed_acc,
                pruned_loss,
                pruned_acc,
                zeroed_loss - base_loss,
            )
        )
        report(progress, (i + 1) / len(ratios), f"ratio {ratio:.3f}: accuracy {pruned_acc:.1%}")
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    known = table.dropna(subset=["predicted_increase"])
    rho = (
        rank_correlation(
            torch.tensor(known["predicted_increase"].values), torch.tensor(known["measured_increase"].values)
        )
        if len(known) >= 3
        else float("nan")
    )
    return SensitivityCurve(table, base_loss, base_acc, rho, result.config.method, evaluation.split, count)
