"""The design review report: every item a reviewer asks first, in words and formatted numbers, nothing internal."""

import re

import pytest

from app.report import Review, review_report
from sosp_engine.experiments.bottlenecks import explain, find_bottlenecks
from sosp_engine.experiments.review import mask_accuracy, weights_origin
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.masks import layer_table, mask_summary
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis

from conftest import ROOT

DEMO = str(ROOT / "assets" / "demo" / "resnet20-digits.pt")


@pytest.fixture(scope="module")
def reviewed():
    wb = open_workbench(ModelSetup("resnet20", "digits", DEMO))
    result = run_analysis(
        wb, AnalysisConfig(method="sosp-i", samples=16, setup=ModelSetup("resnet20", "digits", DEMO))
    )
    mask = result.mask(wb.structures, 0.5, "params")
    table = layer_table(wb.structures, mask)
    bottlenecks, rule = find_bottlenecks(table)
    review = Review(
        name="SOSP Lab design review: demo",
        config=result.config,
        weights_origin=weights_origin(DEMO),
        ratio=0.5,
        unit="params",
        summary=mask_summary(wb.structures, mask),
        layers=table,
        bottlenecks=bottlenecks,
        bottleneck_text=explain(bottlenecks, rule),
        exactness="pruned = zero-masked (measured)",
        figures=[],
        accuracy=mask_accuracy(wb, mask),
        trust=["Trust: 0.78 (first-order 0.73, magnitude 0.32)"],
        latency="6.80 ms -> 4.10 ms, 39.7% faster (+- 2.0%) (measured, PyTorch eager on cpu at batch 64 (2 threads))",
    )
    return review, review_report(review)


def test_the_weights_say_where_they_came_from(reviewed):
    _, page = reviewed
    assert "the shipped demo checkpoint resnet20-digits.pt" in page and "SHA-256" in page


def test_accuracy_before_and_right_after_pruning_are_measured_and_fine_tuning_says_how(reviewed):
    review, page = reviewed
    assert f"{review.accuracy.before:.2%}" in page and f"{review.accuracy.after_pruning:.2%}" in page
    assert review.accuracy.before > 0.9 and "not measured here (finetune" in page


def test_counts_have_thousands_separators_and_ratios_read_as_percent(reviewed):
    _, page = reviewed
    assert "272,186 -&gt;" in page and "MACs per sample" in page and "50% of the params" in page
    assert not re.search(r"<td>\d{5,}</td>", page)  # no count without separators in any table


def test_trust_exactness_latency_and_bottleneck_evidence_are_there(reviewed):
    _, page = reviewed
    for item in ("Trust: 0.78", "pruned = zero-masked", "39.7% faster (+- 2.0%)", "<h2>Bottlenecks</h2>"):
        assert item in page


def test_no_internal_field_name_reaches_the_reviewer(reviewed):
    _, page = reviewed
    for internal in (
        "mc_labels",
        "mc labels",
        "setup model spec",
        "min_channels",
        "at_init",
        "memory_budget",
    ):
        assert internal not in page
    assert "samples N&#x27;" in page and "Gauss-Newton outputs" in page


def test_what_was_not_measured_says_where_to_measure_it(reviewed):
    review, _ = reviewed
    bare = review_report(Review(**{**review.__dict__, "accuracy": None, "trust": [], "latency": None}))
    assert "not checked: &#x27;Can its ranking be trusted?&#x27;" in bare
    assert "not measured: &#x27;Prune to a latency target&#x27;" in bare
