"""The trust meter can fail: a method's ranking of independent masks is scored against measured losses, so a
random or a deliberately wrong saliency scores low, and the prediction is calibrated along the order."""

import dataclasses

import pytest
import torch

from conftest import ROOT
from sosp_engine.errors import AnalysisError
from sosp_engine.experiments.sensitivity import Evaluation
from sosp_engine.experiments.trust import FAMILIES, TrustPlan, independent_masks, trust_check
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis

DEMO = str(ROOT / "assets" / "demo" / "resnet20-digits.pt")


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return open_workbench(ModelSetup("resnet20", "digits", DEMO))


def analysed(workbench, method: str, seed: int = 0):
    config = AnalysisConfig(method=method, samples=200, seed=seed, memory_budget_gb=None)
    return run_analysis(workbench, config)


@pytest.fixture(scope="module")
def sosp_h(trained):
    result = analysed(trained, "sosp-h")
    return result, trust_check(result, trained, evaluation=Evaluation(samples=256))


def test_sosp_h_ranks_independent_masks_clearly_better_than_random(trained, sosp_h):
    _, report = sosp_h
    random = trust_check(analysed(trained, "random"), trained, evaluation=Evaluation(samples=256))
    assert report.score > 0.5 and report.score > random.score + 0.3
    assert abs(random.score) < 0.35


def test_a_deliberately_wrong_saliency_scores_low(trained, sosp_h):
    result, _ = sosp_h
    inverted = dataclasses.replace(result, saliency=-result.saliency)
    assert trust_check(inverted, trained, evaluation=Evaluation(samples=256)).score < 0


def test_the_baselines_are_scored_on_the_same_masks(sosp_h):
    _, report = sosp_h
    assert set(report.baseline_scores) == {"first-order", "magnitude"} and set(report.family_scores) == set(
        FAMILIES
    )
    assert report.masks == 64 and len(report.measured) == len(report.scores) == 64


def test_the_calibration_gives_predicted_over_measured_per_ratio_and_where_it_holds(sosp_h):
    _, report = sosp_h
    shares = {c["ratio"]: c["predicted_over_measured"] for c in report.calibration}
    assert set(report.holds_at) == {r for r, s in shares.items() if s and 1 / 2 <= s <= 2}
    assert "2x" in report.verdict and "Spearman" in report.verdict


def test_independent_masks_have_one_size_and_are_not_all_prefixes(sosp_h):
    result, _ = sosp_h
    masks = independent_masks(result, 30, 10)
    prefix = set(result.pruning_order[:30].tolist())
    assert {len(m) for m in masks} == {30} and sum(set(m.tolist()) != prefix for m in masks) == 10


def test_too_few_masks_is_a_clear_error(trained, sosp_h):
    result, _ = sosp_h
    with pytest.raises(AnalysisError, match="at least 4 masks"):
        trust_check(result, trained, TrustPlan(masks=2))


def test_other_weights_than_the_analysis_ran_on_are_refused(sosp_h):
    result, _ = sosp_h
    with pytest.raises(AnalysisError, match="not the ones the analysis ran on"):
        trust_check(result, open_workbench(ModelSetup("resnet20", "digits")), TrustPlan(masks=8))


def test_a_ranking_is_trusted_only_above_the_threshold_and_every_baseline():
    from sosp_engine.experiments.trust import TRUSTED_SCORE, is_trusted

    assert is_trusted(TRUSTED_SCORE + 0.1, {"magnitude": 0.2, "random": 0.0})
    assert not is_trusted(TRUSTED_SCORE + 0.1, {"magnitude": TRUSTED_SCORE + 0.2})
    assert not is_trusted(TRUSTED_SCORE - 0.1, {})
    assert not is_trusted(float("nan"), {})
