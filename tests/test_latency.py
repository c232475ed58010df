"""The latency target unit: a profile measured along the pruning order, and the shortest prefix that reaches a target."""
import json

import pytest

from sosp_engine.analysis import AnalysisConfig, AnalysisResult, run_analysis
from sosp_engine.cli import main
from sosp_engine.errors import AnalysisError
from sosp_engine.latency import LatencyProfile, measure_profile
from sosp_engine.loading import open_workbench



def profile(prefixes=(0, 10, 20), relative=(1.0, 0.8, 0.5)) -> LatencyProfile:
    return LatencyProfile("cpu", 1, 1, 0.01, list(prefixes), list(relative))


def test_a_latency_target_takes_the_shortest_prefix_the_profile_predicts_to_reach_it():
    curve = profile()
    k = curve.prefix_for(0.3, 20)  # 0.7 of the unpruned latency lies between the points at 10 and 20
    assert k == 14 and curve.predict(k) <= 0.7 < curve.predict(k - 1)


def test_a_rounded_order_stops_the_latency_target_at_a_rounding_stop():
    assert profile().prefix_for(0.3, 20, stops=[0, 8, 16, 20]) == 16


def test_a_latency_reduction_beyond_the_measured_one_is_a_clear_error():
    with pytest.raises(AnalysisError, match="at most 0.500 was measured"):
        profile().prefix_for(0.6, 20)


def test_the_profile_runs_from_the_unpruned_net_to_the_last_prunable_prefix_and_reloads(tmp_path):
    wb = open_workbench("resnet20", "synthetic:3,8,8:10")
    result = run_analysis(wb, AnalysisConfig(method="magnitude", samples=8))
    curve = measure_profile(wb.model, wb.structures, result.ordered_keys(), result.n_prunable, wb.example,
                            points=3, repeats=2)
    assert curve.prefixes[0] == 0 and curve.relative[0] == 1.0 and curve.prefixes[-1] == result.n_prunable
    assert len(curve.prefixes) == 3 and all(r > 0 for r in curve.relative) and curve.reference_seconds > 0
    assert LatencyProfile.load(curve.save(tmp_path / "latency.json")) == curve


def test_analyze_with_a_latency_target_writes_the_profile_and_the_mask_it_predicts(tmp_path, capsys):
    out = tmp_path / "a"
    # a small target at a batch where convolutions, not Python overhead, set the latency: a loaded machine still reaches it
    assert main(["analyze", "--model", "resnet20", "--data", "synthetic:3,16,16:10", "--method", "magnitude",
                 "--samples", "8", "--unit", "latency", "--ratio", "0.05", "--latency-batch", "16",
                 "--latency-points", "4", "--out", str(out)]) == 0
    assert "less measured (target 5.0%, predicted" in capsys.readouterr().out
    curve = LatencyProfile.load(out / "latency.json")
    mask = json.loads((out / "mask.json").read_text())
    assert len(mask["pruned"]) == curve.prefix_for(0.05, AnalysisResult.load(out).n_prunable)
    assert main(["bottlenecks", str(out)]) == 0  # reads the latency mask back through the stored profile
