"""Latency where the model ships: timing in ONNX Runtime next to eager PyTorch, and what a mask buys there (latency
drop against MAC drop along the order, plain and rounded)."""

import json

import pandas as pd
import pytest
import torch

from sosp_engine.cli.main import main
from sosp_engine.errors import AnalysisError
from sosp_engine.latency.deployment import (
    DeploymentGrid,
    efficiency_summary,
    efficiency_table,
    order_variants,
)
from sosp_engine.latency.layers import measure_layer_latency
from sosp_engine.latency.profile import (
    LatencyProfile,
    LatencyTiming,
    latency_times,
    measure_profile,
    stored_profile,
)
from sosp_engine.latency.runtimes import forward_call, onnxruntime_providers
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.pruning.masks import mask_summary
from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis


@pytest.fixture(scope="module")
def analysed():
    torch.manual_seed(0)
    wb = open_workbench(ModelSetup("resnet20", "synthetic:3,8,8:10"))
    return wb, run_analysis(wb, AnalysisConfig(method="magnitude", samples=8))


def test_onnxruntime_times_the_exported_net_which_computes_what_the_model_computes(analysed):
    wb, _ = analysed
    x = torch.randn(4, 3, 8, 8)
    got = forward_call(wb.model, x, "onnxruntime", torch.device("cpu"))()[0]
    with torch.no_grad():
        expected = wb.model.eval()(x)
    assert torch.allclose(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


def test_timing_in_onnxruntime_leaves_the_eager_model_as_it_was(analysed):
    wb, _ = analysed
    wb.model.train()
    pruned, unpruned = latency_times(
        wb.model, wb.model, wb.example, LatencyTiming("cpu", 2, "onnxruntime", repeats=3)
    )
    assert wb.model.training and pruned.median > 0 and unpruned.spread >= 0 and len(pruned.seconds) == 3


def test_an_unknown_runtime_is_refused_before_any_timing(analysed):
    wb, _ = analysed
    with pytest.raises(AnalysisError, match="unknown latency runtime 'tensorrt'"):
        latency_times(wb.model, None, wb.example, LatencyTiming(runtime="tensorrt"))
    with pytest.raises(
        AnalysisError, match="latency_runtime: Input should be 'eager' or 'onnxruntime' \\(got 'tvm'\\)"
    ):
        AnalysisConfig(latency_runtime="tvm").validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine may carry onnxruntime-gpu")
def test_a_gpu_without_onnxruntime_gpu_providers_says_what_to_install():
    import onnxruntime

    if set(onnxruntime.get_available_providers()) & {"CUDAExecutionProvider", "TensorrtExecutionProvider"}:
        pytest.skip("this onnxruntime has GPU providers")
    with pytest.raises(AnalysisError, match="install onnxruntime-gpu"):
        onnxruntime_providers(torch.device("cuda"))


def test_a_profile_records_its_runtime_and_says_where_it_was_timed(analysed):
    wb, result = analysed
    curve = measure_profile(
        wb, result.order(wb.structures), LatencyTiming(runtime="onnxruntime", points=2, repeats=2)
    )
    assert curve.runtime == "onnxruntime" and "ONNX Runtime on cpu at batch 1" in curve.where()


def test_a_profile_stored_before_runtimes_reads_as_eager(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(
        json.dumps(
            {
                "device": "cpu",
                "batch": 1,
                "threads": 1,
                "reference_seconds": 0.01,
                "prefixes": [0, 4],
                "relative": [1.0, 0.5],
            }
        )
    )
    assert LatencyProfile.load(path).runtime == "eager"


def test_a_stored_profile_of_another_runtime_is_timed_again_in_the_asked_one(analysed, tmp_path):
    wb, result = analysed
    LatencyProfile("cpu", 1, 1, 0.01, [0, result.n_prunable], [1.0, 0.5]).save(tmp_path / "latency.json")
    curve = stored_profile(result, wb, tmp_path, LatencyTiming(runtime="onnxruntime", points=2))
    assert curve.runtime == "onnxruntime"
    assert LatencyProfile.load(tmp_path / "latency.json").runtime == "onnxruntime"


def test_layer_latencies_can_be_timed_in_onnxruntime(analysed):
    wb, _ = analysed
    table = measure_layer_latency(
        wb.model, wb.structures, wb.example, LatencyTiming(runtime="onnxruntime", repeats=3)
    )
    assert table.runtime == "onnxruntime" and "ONNX Runtime" in table.describe()
    assert table.timed_dimensions > 0 and len(table.per_channel) == 2 * len(table.modules)


def test_the_efficiency_table_has_a_row_per_prefix_runtime_and_batch_with_counted_mac_drops(analysed):
    wb, result = analysed
    orders = order_variants(result, wb.structures, [])
    table = efficiency_table(
        wb, orders, DeploymentGrid(["eager", "onnxruntime"], [1, 2], points=3, repeats=2)
    )
    assert len(table) == 2 * 2 * 2  # two nonzero prefixes, two runtimes, two batches
    keys = orders["as analysed"].keys
    for k, rows in table.groupby("structures_pruned"):
        expected = mask_summary(wb.structures, set(keys[:k]))["mac_ratio"]
        assert rows["mac_drop"].tolist() == pytest.approx([expected] * len(rows), rel=1e-9)
    assert (table["efficiency"] == table["latency_drop"] / table["mac_drop"]).all()
    summary = efficiency_summary(table)
    assert len(summary) == 4 and set(summary["prefixes"]) == {2}


def test_a_rounded_order_is_timed_only_where_every_layer_keeps_a_multiple_of_its_rounding(analysed):
    wb, result = analysed
    rounded = order_variants(result, wb.structures, [8])["rounded to 8"]
    keys = rounded.keys
    table = efficiency_table(
        wb, {"rounded to 8": rounded}, DeploymentGrid(["eager"], [1], points=3, repeats=1)
    )
    sizes = wb.structures.layer_sizes().tolist()
    for k in table["structures_pruned"]:
        pruned = wb.structures.pruned_vector(set(keys[:k]))
        per_layer = torch.zeros(len(sizes), dtype=torch.long).index_add_(
            0, wb.structures.layer_of, pruned.long()
        )
        assert all((size - gone) % 8 == 0 for size, gone in zip(sizes, per_layer.tolist()) if gone)


def test_the_efficiency_table_refuses_an_empty_choice(analysed):
    wb, result = analysed
    with pytest.raises(AnalysisError, match="at least one runtime"):
        efficiency_table(wb, order_variants(result, wb.structures, []), DeploymentGrid([], [1]))


def test_analyze_times_its_latency_target_in_the_runtime_asked_for(tmp_path):
    out = tmp_path / "a"
    argv = [
        "analyze",
        "--model",
        "resnet20",
        "--data",
        "synthetic:3,8,8:10",
        "--method",
        "magnitude",
        "--samples",
        "8",
        "--unit",
        "latency",
        "--ratio",
        "0.05",
        "--latency-batch",
        "8",
        "--latency-points",
        "3",
        "--latency-runtime",
        "onnxruntime",
        "--out",
        str(out),
    ]
    assert main(argv) in (0, 2)  # 2: a loaded machine refused the target as unresolvable; the profile is kept
    assert LatencyProfile.load(out / "latency.json").runtime == "onnxruntime"


@pytest.fixture(scope="module")
def analysis_folder(tmp_path_factory):
    """A magnitude analysis written by the CLI, for the deployment command to read."""
    out = tmp_path_factory.mktemp("deployment") / "a"
    argv = ["analyze", "--model", "resnet20", "--data", "synthetic:3,8,8:10", "--method", "magnitude"]
    assert main(argv + ["--samples", "8", "--out", str(out)]) == 0
    return out


def test_the_deployment_command_writes_the_efficiency_table(analysis_folder, tmp_path, capsys):
    out = analysis_folder
    csv = tmp_path / "deployment.csv"
    assert (
        main(
            [
                "deployment",
                str(out),
                "--batches",
                "1",
                "--points",
                "2",
                "--repeats",
                "2",
                "--round-to",
                "8",
                "--out",
                str(csv),
            ]
        )
        == 0
    )
    table = pd.read_csv(csv)
    assert set(table["runtime"]) == {"eager", "onnxruntime"} and set(table["order"]) == {
        "as analysed",
        "rounded to 8",
    }
    assert "efficiency = latency drop / MAC drop" in capsys.readouterr().err


def test_the_deployment_command_refuses_a_batch_of_zero(analysis_folder, capsys):
    out = analysis_folder
    assert main(["deployment", str(out), "--batches", "0"]) != 0
    assert "--batches takes whole numbers >= 1" in capsys.readouterr().err


def test_the_prefix_at_a_ratio_is_the_next_rounding_stop_within_the_prunable_part():
    from sosp_engine.latency.deployment import prefixes_at

    assert prefixes_at([0.5, 0.75], 100, 90, list(range(0, 91, 8))) == [56, 80]
    assert prefixes_at([0.99], 100, 90, list(range(91))) == [90]
    with pytest.raises(AnalysisError, match="pruning ratios must be in"):
        prefixes_at([1.0], 100, 90, [0, 90])


def test_rows_whose_latency_drop_is_within_its_spread_are_marked_and_named(analysed, monkeypatch):
    from sosp_engine.latency import deployment
    from sosp_engine.latency.deployment import unresolved_warning
    from sosp_engine.latency.profile import LatencyComparison

    wb, result = analysed
    measured = iter([LatencyComparison(0.001, 0.6, 0.01), LatencyComparison(0.001, 0.98, 0.05)])
    monkeypatch.setattr(deployment, "compare_latency", lambda *args, **kwargs: next(measured))
    table = efficiency_table(
        wb, order_variants(result, wb.structures, []), DeploymentGrid(["eager"], [1], points=3)
    )
    assert table["resolved"].tolist() == [True, False]
    assert unresolved_warning(table).startswith("1 of 2 rows measured a latency drop within twice")
    assert unresolved_warning(table[table["resolved"]]) is None
