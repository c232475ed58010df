import math

import pytest
import torch

from sosp_engine.saliency.methods import METHODS
from sosp_engine.saliency.analysis import (
    AnalysisConfig,
    AnalysisResult,
    reestimate_batchnorm,
    run_analysis,
)
from sosp_engine.cli.main import main
from sosp_engine.errors import AnalysisError
from sosp_engine.pruning.exactness import EXACTNESS_SAMPLES, exactness_line
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.pruning.masks import load_mask, mask_summary
from sosp_engine.nets import build_model
from sosp_engine.progress import Cancelled


@pytest.fixture(scope="module")
def workbench():
    torch.manual_seed(0)
    return open_workbench(ModelSetup("resnet20", "digits"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_an_order_over_all_structures(workbench, method):
    result = run_analysis(workbench, AnalysisConfig(method=method, samples=40, batch_size=20))
    assert sorted(result.pruning_order.tolist()) == list(range(workbench.structures.num_structures))
    assert (
        result.saliency.shape == (workbench.structures.num_structures,)
        and torch.isfinite(result.saliency).all()
    )
    assert {"saliency", "selection"} <= set(result.timings)


def test_masks_at_growing_ratios_are_nested_prefixes(workbench):
    result = run_analysis(workbench, AnalysisConfig(method="sosp-h", samples=40))
    small, large = result.mask(workbench.structures, 0.2), result.mask(workbench.structures, 0.6)
    assert small < large and len(large) == math.ceil(0.6 * workbench.structures.num_structures)


def test_result_round_trips_through_files(tmp_path, workbench):
    result = run_analysis(workbench, AnalysisConfig(method="sosp-i", samples=40))
    loaded = AnalysisResult.load(result.save(tmp_path / "a"))
    assert (
        loaded.config == result.config
        and loaded.keys == result.keys
        and loaded.n_prunable == result.n_prunable
    )
    assert torch.equal(loaded.pruning_order, result.pruning_order) and torch.equal(
        loaded.saliency, result.saliency
    )
    assert loaded.weights_fingerprint == result.weights_fingerprint


def test_loading_a_folder_without_a_result_is_a_clear_error(tmp_path):
    with pytest.raises(AnalysisError, match="no saved analysis"):
        AnalysisResult.load(tmp_path)


def test_analysis_at_init_is_seeded_and_ignores_the_given_weights(workbench):
    a = run_analysis(workbench, AnalysisConfig(method="sosp-h", samples=40, at_init=True, seed=1))
    b = run_analysis(workbench, AnalysisConfig(method="sosp-h", samples=40, at_init=True, seed=1))
    trained = run_analysis(workbench, AnalysisConfig(method="sosp-h", samples=40))
    assert a.weights_fingerprint == b.weights_fingerprint != trained.weights_fingerprint
    assert torch.equal(a.pruning_order, b.pruning_order)


def test_batchnorm_statistics_are_reestimated_on_the_samples():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1)
    x = torch.randn(64, 1, 16, 16) * 3 + 2
    reestimate_batchnorm(model, x, 16)
    with torch.no_grad():
        expected = model.conv1(x)
    torch.testing.assert_close(model.bn1.running_mean, expected.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not model.training and model.bn1.momentum == 0.1


def test_analysis_can_be_cancelled(workbench):
    with pytest.raises(Cancelled):
        run_analysis(workbench, AnalysisConfig(method="sosp-i", samples=40), should_stop=lambda: True)


def test_progress_reaches_one(workbench):
    seen = []
    run_analysis(
        workbench,
        AnalysisConfig(method="sosp-h", samples=40, batch_size=10),
        progress=lambda f, m: seen.append(f),
    )
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_bad_method_is_a_clear_error(workbench):
    with pytest.raises(AnalysisError, match="wrong value at method: .*'sosp-h'.*\\(got 'obd'\\)"):
        run_analysis(workbench, AnalysisConfig(method="obd"))


def test_cli_analyze_writes_result_mask_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "analyze",
            "--model",
            "resnet20",
            "--data",
            "digits",
            "--method",
            "sosp-h",
            "--samples",
            "50",
            "--ratio",
            "0.3",
            "--unit",
            "params",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert {"analysis.json", "tensors.pt", "mask.json", "layers.csv"} <= {p.name for p in out.iterdir()}
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    summary = mask_summary(wb.structures, load_mask(out / "mask.json", wb.structures))
    assert summary["param_ratio"] >= 0.3
    assert "pruned" in capsys.readouterr().out


def test_cli_analyze_can_record_the_result_in_the_workspace(tmp_path):
    from sosp_engine.runs.store import Store

    code = main(
        [
            "analyze",
            "--model",
            "resnet20",
            "--method",
            "magnitude",
            "--samples",
            "20",
            "--out",
            str(tmp_path / "a"),
            "--name",
            "from the CLI",
            "--workspace",
            str(tmp_path / "ws"),
        ]
    )
    assert code == 0 and [r["name"] for r in Store(tmp_path / "ws").analyses()] == ["from the CLI"]


def test_the_exactness_check_measures_only_the_few_samples_detection_needs(workbench):
    result = run_analysis(workbench, AnalysisConfig(method="magnitude", samples=40))
    assert result.exactness["samples"] == EXACTNESS_SAMPLES < 40


def test_a_second_analysis_of_the_same_net_reuses_the_exactness_verdict(workbench):
    first = run_analysis(workbench, AnalysisConfig(method="magnitude", samples=40))
    second = run_analysis(workbench, AnalysisConfig(method="first-order", samples=40))
    assert second.exactness["reused"] and second.exactness["measured_at"] == first.exactness["measured_at"]
    assert "reused" in exactness_line(second.exactness)


def test_other_weights_are_measured_again(workbench):
    fresh = run_analysis(workbench, AnalysisConfig(method="magnitude", samples=40, at_init=True, seed=987))
    assert fresh.exactness["reused"] is False and fresh.exactness["seconds"] > 0


def test_an_analysis_says_what_it_does_before_its_kernel_starts():
    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench
    from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis

    said = []
    run_analysis(
        open_workbench(ModelSetup("resnet20x0.25", "digits")),
        AnalysisConfig(method="sosp-h", samples=8, batch_size=4, memory_budget_gb=4.0),
        progress=lambda fraction, message: said.append(message),
    )
    assert said[:3] == ["drawing 8 samples", "copying the model", said[2]] and said[2].startswith(
        "measuring the memory"
    )
    assert any("exactness" in m for m in said) and said[-1] == "done"


def test_an_all_zero_output_layer_is_named_when_every_saliency_is_zero():
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    head = [m for m in wb.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    with pytest.raises(AnalysisError, match=r"every sosp-h saliency is zero.*is all zero.*ViT heads"):
        run_analysis(wb, AnalysisConfig(method="sosp-h", samples=8, batch_size=8))


def test_an_analysis_reopens_on_its_checkpoint_or_a_moved_one_and_at_init_on_none():
    setup = ModelSetup("resnet20", "digits", "trained.pt")
    trained = AnalysisResult.__new__(AnalysisResult)
    trained.config = AnalysisConfig(setup=setup)
    assert trained.opening_setup().weights == "trained.pt"
    assert trained.opening_setup("moved/trained.pt").weights == "moved/trained.pt"
    trained.config = AnalysisConfig(setup=setup, at_init=True)
    assert trained.opening_setup("moved/trained.pt").weights is None


def test_an_analysis_stored_under_an_earlier_version_s_layer_names_opens_with_the_same_masks(tmp_path):
    torch.manual_seed(0)
    bench = open_workbench(ModelSetup("resnet20", "digits", preset=None))
    result = run_analysis(bench, AnalysisConfig(method="sosp-h", samples=40, setup=bench.setup))
    stream = next(layer for layer in bench.structures.layers if "layer2.0.shortcut.0" in layer.producers)
    assert stream.name == "layer2.0.conv2"  # torch-pruning named this layer after its shortcut conv
    before = result.mask(bench.structures, 0.4)
    folder = result.save(tmp_path / "old")
    old = (folder / "analysis.json").read_text().replace('"layer2.0.conv2:', '"layer2.0.shortcut.0:')
    (folder / "analysis.json").write_text(old)
    stored = AnalysisResult.load(folder)
    assert any(k.startswith("layer2.0.shortcut.0:") for k in stored.keys)
    assert stored.mask(bench.structures, 0.4) == before and stored.keys == bench.structures.keys


def test_the_stored_analysis_accounts_for_every_channel_of_every_producer(workbench):
    result = run_analysis(workbench, AnalysisConfig(method="sosp-h", samples=40))
    assert {row["module"] for row in result.channels} >= {"conv1", "layer3.2.conv2", "linear"}
    assert all(r["offered"] + r["unprunable"] + r["excluded"] == r["width"] for r in result.channels)
