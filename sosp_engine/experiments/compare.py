"""Compare two analyses of one architecture: layer-wise ratios, mask overlap, rank correlation of saliencies."""

from __future__ import annotations

import torch

from ..saliency.analysis import AnalysisResult
from ..errors import AnalysisError
from ..pruning.masks import compare_masks
from ..pruning.structures import StructureSet


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (Pearson correlation of ranks; ties get their mean rank)."""

    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        uniq, inverse = torch.unique(v, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
        return (sums / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def compare_analyses(
    structures: StructureSet,
    first: AnalysisResult,
    second: AnalysisResult,
    ratio: float,
    unit: str = "structures",
):
    """(per-layer table, overall figures) of two analyses' masks at one ratio, plus their saliencies' rank
    correlation."""
    if first.keys != second.keys:
        raise AnalysisError(
            "the two analyses are of different architectures (or exclusions); pick two of the same model"
        )
    table, overall = compare_masks(
        structures, first.mask(structures, ratio, unit), second.mask(structures, ratio, unit)
    )
    overall["rank_correlation"] = rank_correlation(first.saliency, second.saliency)
    per_layer = []
    for g in range(len(structures.layers)):
        members = structures.layer_of == g
        per_layer.append(
            rank_correlation(first.saliency[members], second.saliency[members]) if members.sum() > 1 else 1.0
        )
    table["rank_correlation"] = per_layer
    return table, overall
