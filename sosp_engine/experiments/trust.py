"""How far to trust an analysis on this net: a check that can fail.

Along one pruning order both the predicted and the measured loss increase grow with the prefix, so their rank
correlation is near 1 whatever the method. This check instead
(1) ranks many masks of one size that the method scores differently and correlates the method's score of each mask
    (the sum of its saliencies) with the loss increase measured on the zero-masked net, within each of two families:
    random masks, and the order's own prefix with some structures swapped. The score is the mean of the two
    families' Spearman correlations (pooled, the families' different mean losses would decide it); a method that
    ranks at random scores near 0;
(2) scores the same masks with baselines (first-order, magnitude), so the user sees whether second order adds
    anything on this net;
(3) calibrates the predicted against the measured increase along the order: their ratio per pruning ratio, and the
    range of ratios where the prediction holds within a factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..devices import resolve_device
from ..errors import AnalysisError
from ..pruning.workbench import Workbench
from ..progress import ProgressFn, StopFn, check_cancel, report
from ..pruning.masks import zeroed_copy
from ..saliency.analysis import AnalysisResult, compute_saliency
from ..saliency.common import AnalysisInputs
from .compare import rank_correlation
from .sensitivity import Evaluation, evaluated_model
from .training import evaluate

BASELINES = ("first-order", "magnitude")
TRUSTED_SCORE = 0.5  # a ranking score at least this high (and above every baseline's floor) is trusted
NOISE_SHARE = (
    0.01  # measured increases below this share of the unpruned loss are within the evaluation's noise
)


@dataclass
class TrustReport:
    """The ranking scores on independent masks, the calibration along the order, and the verdict in words."""

    method: str
    size: int  # structures per independent mask
    masks: int
    score: float  # mean over the mask families of Spearman's rho, the method's mask scores vs the measured increases
    family_scores: dict[str, float]
    baseline_scores: dict[str, float]
    calibration: list[dict]  # per ratio: predicted, measured, predicted / measured
    factor: float
    holds_at: list[float]  # the ratios where the prediction is within `factor` of the measured increase
    verdict: str
    measured: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        """Whether its ranking can be trusted: a score of at least TRUSTED_SCORE, above every baseline's."""
        return is_trusted(self.score, self.baseline_scores)

    def to_json(self) -> dict:
        def finite(v: float) -> float | None:
            return None if v is None or math.isnan(v) else v

        return {
            "method": self.method,
            "size": self.size,
            "masks": self.masks,
            "score": finite(self.score),
            "family_scores": {k: finite(v) for k, v in self.family_scores.items()},
            "baseline_scores": {k: finite(v) for k, v in self.baseline_scores.items()},
            "calibration": self.calibration,
            "factor": self.factor,
            "holds_at": self.holds_at,
            "verdict": self.verdict,
        }


def independent_masks(result: AnalysisResult, size: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` masks of `size` structures among the prunable ones: half random, half the order's prefix of that
    size with between one structure and half of them swapped for others (index tensors)."""
    generator = torch.Generator().manual_seed(seed)
    prunable = result.pruning_order[: result.n_prunable]
    if not 0 < size < len(prunable):
        raise AnalysisError(f"a mask of {size} structures cannot differ among {len(prunable)} prunable ones")
    masks = []
    for i in range(count):
        if i % 2 == 0:
            masks.append(prunable[torch.randperm(len(prunable), generator=generator)[:size]])
            continue
        inside, outside = prunable[:size].clone(), prunable[size:]
        swaps = int(torch.randint(1, max(2, size // 2 + 1), (1,), generator=generator))
        swaps = min(swaps, len(outside))
        slots = torch.randperm(size, generator=generator)[:swaps]
        inside[slots] = outside[torch.randperm(len(outside), generator=generator)[:swaps]]
        masks.append(inside)
    return masks


FAMILIES = ("random", "prefix with swaps")  # independent_masks alternates them


def family_scores(scores: list[float], measured: list[float]) -> dict[str, float]:
    """Spearman's rho of scores against measured increases within each mask family."""
    s, m = torch.tensor(scores), torch.tensor(measured)
    return {
        name: rank_correlation(s[i :: len(FAMILIES)], m[i :: len(FAMILIES)])
        for i, name in enumerate(FAMILIES)
    }


def mean_score(families: dict[str, float]) -> float:
    return sum(families.values()) / len(families)


def mask_score(saliency: torch.Tensor, mask: torch.Tensor) -> float:
    """A per-structure method's score of a mask: the sum of its saliencies (its predicted loss increase)."""
    return float(saliency[mask].sum())


def is_trusted(score: float, baselines: dict[str, float]) -> bool:
    """The verdict's rule: a ranking score of at least TRUSTED_SCORE, above the best baseline's where there is one."""
    best = max(baselines.values(), default=None)
    return not (math.isnan(score) or score < TRUSTED_SCORE) and not (best is not None and score <= best)


def _verdict(
    method: str, score: float, baselines: dict[str, float], holds_at: list[float], factor: float
) -> str:
    best = max(baselines.items(), key=lambda kv: kv[1], default=(None, float("nan")))
    ranking = (
        f"{method} ranks masks of one size with Spearman {score:.2f} (mean over random and near-order masks) against "
        "the measured loss increase" + (f" ({best[0]}: {best[1]:.2f})" if best[0] else "")
    )
    if is_trusted(score, baselines):
        trust = "its ranking can be trusted"
    elif math.isnan(score) or score < TRUSTED_SCORE:
        trust = "do not rely on its ranking on this net"
    else:
        trust = f"it ranks well, but no better than {best[0]}: second order adds nothing here"
    band = (
        f"its predicted increase is within {factor:g}x of the measured one at "
        + ", ".join(f"{r:.0%}" for r in holds_at)
        + " pruned"
        if holds_at
        else f"its predicted increase is off by more than {factor:g}x at every measured ratio"
    )
    return f"{ranking}: {trust}; {band}."


def _baseline_scores(
    inputs: AnalysisInputs,
    result: AnalysisResult,
    chosen: list[torch.Tensor],
    measured: list[float],
    should_stop: StopFn,
) -> dict[str, float]:
    """Each baseline's ranking score on the same masks and measured increases as the analysis's."""
    scores = {}
    for method in BASELINES:
        check_cancel(should_stop)
        saliency = compute_saliency(inputs, replace(result.config, method=method), "none").saliency
        scores[method] = mean_score(family_scores([mask_score(saliency, m) for m in chosen], measured))
    return scores


@dataclass(frozen=True)
class TrustPlan:
    """How an analysis is scored: `masks` independent masks of `ratio` of the structures, and its prediction
    calibrated at `ratios` along the order (held where within `factor` of the measured loss increase)."""

    ratio: float = 0.1
    masks: int = 64
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    factor: float = 2.0

    def check(self) -> None:
        if self.masks < 4:
            raise AnalysisError(f"a ranking score needs at least 4 masks, got {self.masks}")
        if not self.factor > 1:
            raise AnalysisError(f"the calibration factor must be above 1, got {self.factor}")


def trust_check(
    result: AnalysisResult,
    workbench: Workbench,
    plan: TrustPlan = TrustPlan(),
    evaluation: Evaluation = Evaluation(),
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> TrustReport:
    """Score the analysis (and the baselines) on independent masks and calibrate its prediction along the order, as
    `plan` says; every loss is measured on the zero-masked net, the net the saliencies describe."""
    plan.check()
    structures = workbench.structures
    result.check_structures(structures)
    ratio, masks, ratios, factor = plan.ratio, plan.masks, plan.ratios, plan.factor
    target = resolve_device(evaluation.device)
    model = evaluated_model(result, workbench, target)
    x, y = workbench.data.analysis_samples(result.config.samples, result.config.seed)
    loader = evaluation.loader(workbench)
    base_loss, _ = evaluate(model, loader, target, amp=False)
    size = max(1, min(result.n_prunable - 1, round(ratio * len(result.keys))))
    chosen = independent_masks(result, size, masks, result.config.seed)
    steps = len(chosen) + len(ratios)

    def increase(mask: torch.Tensor) -> float:
        keys = {result.keys[s] for s in mask.tolist()}
        return evaluate(zeroed_copy(model, structures, keys), loader, target, amp=False)[0] - base_loss

    measured = []
    for i, mask in enumerate(chosen):
        check_cancel(should_stop)
        measured.append(increase(mask))
        report(progress, (i + 1) / steps, f"independent mask {i + 1}/{len(chosen)}")
    scores = [mask_score(result.saliency, mask) for mask in chosen]
    families = family_scores(scores, measured)

    inputs = AnalysisInputs(
        model, structures, x.to(target), y.to(target), result.config.loss, evaluation.batch_size
    )
    baseline_scores = _baseline_scores(inputs, result, chosen, measured, should_stop)

    calibration = []
    for j, r in enumerate(ratios):
        check_cancel(should_stop)
        k = result.prefix(structures, r, "structures")
        predicted = result.predicted_increase(k)
        observed = increase(result.pruning_order[:k])
        share = predicted / observed if predicted is not None and observed > NOISE_SHARE * base_loss else None
        calibration.append(
            {"ratio": r, "predicted": predicted, "measured": observed, "predicted_over_measured": share}
        )
        report(progress, (len(chosen) + j + 1) / steps, f"calibration at {r:.0%}")
    holds_at = [
        c["ratio"]
        for c in calibration
        if c["predicted_over_measured"] and 1 / factor <= c["predicted_over_measured"] <= factor
    ]
    verdict = _verdict(result.config.method, mean_score(families), baseline_scores, holds_at, factor)
    return TrustReport(
        result.config.method,
        size,
        len(chosen),
        mean_score(families),
        families,
        baseline_scores,
        calibration,
        factor,
        holds_at,
        verdict,
        measured,
        scores,
    )
