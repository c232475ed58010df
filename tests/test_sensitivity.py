import json

import pytest
import torch

from sosp_engine.saliency.analysis import AnalysisConfig, AnalysisResult, run_analysis
from sosp_engine.cli.main import main
from sosp_engine.errors import AnalysisError
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.pruning.masks import zeroed_copy
from sosp_engine.experiments.sensitivity import (
    Evaluation,
    even_grid,
    max_reduction,
    parse_grid,
    sensitivity_curve,
)
from sosp_engine.experiments.training import evaluate


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("analysis")
    torch.save(open_workbench(ModelSetup("resnet20", "digits")).model.state_dict(), folder / "w.pt")
    wb = open_workbench(ModelSetup("resnet20", "digits", str(folder / "w.pt")))
    result = run_analysis(
        wb,
        AnalysisConfig(method="sosp-i", samples=64, batch_size=64, setup=ModelSetup(device="cpu")),
    )
    result.save(folder)
    return wb, result, folder


def test_the_measured_curve_equals_evaluating_zero_masked_models_by_hand(analysed):
    wb, result, _ = analysed
    curve = sensitivity_curve(result, wb, [0.0, 0.3], "params", Evaluation(samples=60, device="cpu"))
    loader = wb.data.loader("val", 256, limit=60)
    by_hand = evaluate(
        zeroed_copy(wb.model, wb.structures, result.mask(wb.structures, 0.3, "params")),
        loader,
        "cpu",
        amp=False,
    )
    row = curve.table.iloc[1]
    assert (row["zeroed_loss"], row["zeroed_acc"]) == pytest.approx(by_hand)
    assert curve.table.iloc[0]["measured_increase"] == pytest.approx(0.0, abs=1e-12)
    assert curve.samples == 60 and row["params"] <= 0.7 * curve.table.iloc[0]["params"]


def test_the_physically_pruned_net_scores_like_the_zero_masked_one_where_pruning_is_exact(analysed):
    wb, result, _ = analysed
    table = sensitivity_curve(result, wb, [0.5], evaluation=Evaluation(samples=60, device="cpu")).table
    assert table["pruned_loss"].iloc[0] == pytest.approx(table["zeroed_loss"].iloc[0], rel=1e-4)


def test_predicted_increases_grow_along_the_order_and_survive_saving(analysed):
    wb, result, folder = analysed
    table = sensitivity_curve(
        AnalysisResult.load(folder), wb, [0.1, 0.3, 0.5], evaluation=Evaluation(samples=60, device="cpu")
    ).table
    assert table["predicted_increase"].is_monotonic_increasing and table["predicted_increase"].iloc[0] > 0


def test_other_weights_than_the_analysed_ones_are_refused(analysed):
    wb, result, _ = analysed
    torch.manual_seed(5)
    other = open_workbench(ModelSetup("resnet20", wb.data.spec), wb.data)
    with pytest.raises(AnalysisError, match="not the ones the analysis ran on"):
        sensitivity_curve(result, other, [0.1], evaluation=Evaluation(device="cpu"))


def test_grids_are_parsed_sorted_and_checked():
    assert parse_grid("0.5, 0,0.25") == [0.0, 0.25, 0.5]
    with pytest.raises(AnalysisError, match=r"\[0, 1\)"):
        parse_grid("0.2,1.5")
    with pytest.raises(AnalysisError, match="comma-separated"):
        parse_grid("a,b")
    assert even_grid(3, 0.8) == [0.0, pytest.approx(0.4), pytest.approx(0.8, abs=1e-5)]


def test_the_even_grid_stops_at_the_largest_reduction_the_cap_allows(analysed):
    wb, result, _ = analysed
    top = max_reduction(result, wb.structures, "macs")
    assert 0 < top < 1
    sensitivity_curve(result, wb, [even_grid(2, top)[-1]], "macs", Evaluation(samples=20, device="cpu"))


def test_the_rank_correlation_is_spearmans_rho_over_at_least_three_points(analysed):
    wb, result, _ = analysed
    assert (
        sensitivity_curve(
            result, wb, [0.0, 0.3], evaluation=Evaluation(samples=30, device="cpu")
        ).rank_correlation
        != sensitivity_curve(
            result, wb, [0.0, 0.3], evaluation=Evaluation(samples=30, device="cpu")
        ).rank_correlation
    )  # nan
    curve = sensitivity_curve(
        result, wb, [0.0, 0.2, 0.4, 0.6], evaluation=Evaluation(samples=60, device="cpu")
    )
    ranks = curve.table[["predicted_increase", "measured_increase"]].rank()
    assert curve.rank_correlation == pytest.approx(ranks.corr().iloc[0, 1])


def test_the_cli_writes_the_curve_as_csv_and_json(analysed, tmp_path, capsys):
    _, _, folder = analysed
    assert (
        main(
            [
                "sensitivity",
                str(folder),
                "--grid",
                "0,0.2",
                "--samples",
                "40",
                "--out",
                str(tmp_path / "c.csv"),
            ]
        )
        == 0
    )
    assert (tmp_path / "c.csv").read_text().splitlines()[0].startswith("ratio,unit,pruned_structures")
    assert (
        main(
            [
                "sensitivity",
                str(folder),
                "--points",
                "3",
                "--unit",
                "params",
                "--samples",
                "40",
                "--out",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "c.json").read_text())
    assert len(data["points"]) == 3 and data["samples"] == 40 and data["method"] == "sosp-i"


def test_an_analysis_rounded_to_8_gives_masks_with_widths_in_multiples_of_8(tmp_path):
    from sosp_engine.pruning.masks import layer_table, pruned_copy

    torch.manual_seed(0)
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    result = run_analysis(
        wb,
        AnalysisConfig(
            method="sosp-i", samples=40, batch_size=40, round_to=8, setup=ModelSetup(device="cpu")
        ),
    )
    result.save(tmp_path)
    loaded = AnalysisResult.load(tmp_path)
    for ratio, unit in ((0.3, "structures"), (0.5, "params"), (0.6, "macs")):
        mask = loaded.mask(wb.structures, ratio, unit)
        assert all(k % 8 == 0 for k in layer_table(wb.structures, mask).kept)
        pruned_copy(wb.model, wb.structures, mask, wb.example)
    k = loaded.prefix(wb.structures, 0.5, "params")
    assert loaded.predicted_increase(k) > 0 and loaded.config.round_to == 8
