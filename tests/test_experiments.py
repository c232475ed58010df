import json

import pandas as pd
import pytest
import torch

from conftest import USER_MODEL
from sosp_engine.experiments.bottlenecks import explain, find_bottlenecks, paper_widening, widening_plan
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.cli.main import main
from sosp_engine.experiments.procedures import compare_runs
from sosp_engine.nets import build_model
from sosp_engine.pruning.offered import find_structures
from sosp_engine.pruning.surgery import build_widened, every_layer, params_of, uniform_factor

X32 = torch.randn(1, 3, 32, 32)


def structures_of(spec, preset=None, x=X32):
    return find_structures(build_model(spec), x, preset=preset)


def test_widening_a_resnet_stage_doubles_its_widths():
    s = structures_of("resnet56", "cifar-resnet")
    model, spec = build_widened("resnet56", 10, 3, s, {s.layers[-1].stage: 2.0}, X32)
    assert spec.startswith("resnet56:widths=16,32,128;inner=") and model.layer3[0].conv1.out_channels == 128

    def stage3(w):  # block 0 (conv1 from 32 channels, projection shortcut), 8 more blocks, the classifier
        return (
            32 * w * 9
            + 2 * w
            + w * w * 9
            + 2 * w
            + 32 * w
            + 2 * w
            + 8 * (w * w * 9 * 2 + 4 * w)
            + w * 10
            + 10
        )

    assert params_of(model) - params_of(build_model("resnet56")) == stage3(128) - stage3(64)


def test_widening_one_vgg_layer_changes_its_and_its_consumers_weights():
    s = structures_of("vgg19")
    model, spec = build_widened("vgg19", 10, 3, s, {"features.3": 2.0}, X32)
    base = build_model("vgg19")
    assert params_of(model) - params_of(base) == 64 * (64 * 9 + 2) + 64 * 128 * 9


def test_widening_a_user_model_through_its_dependency_groups():
    x = torch.randn(1, 3, 8, 8)
    s = structures_of(USER_MODEL, x=x)
    model, spec = build_widened(USER_MODEL, 10, 3, s, {"depthwise.0": 2.0}, x)
    assert spec is None and model.depthwise[0].groups == 40 and model.branch_a[0].out_channels == 16
    widened = find_structures(model, x)
    assert widened.counts()[0] == params_of(model) and model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_widen_pruning_factor_matches_the_expanded_net_within_one_channel():
    s = structures_of("resnet20", "cifar-resnet")
    expanded, _ = build_widened("resnet20", 10, 3, s, {s.layers[-1].stage: 2.0}, X32)
    factor, params = uniform_factor("resnet20", 10, 3, s, params_of(expanded), X32)
    one_channel = 2 * (128 * 9 * 2 + 4)  # one channel of the widest layer, in and out weights
    assert factor > 1 and abs(params - params_of(expanded)) <= one_channel
    uniform, _ = build_widened("resnet20", 10, 3, s, every_layer("resnet20", s, factor), X32)
    assert params_of(uniform) == params


def crafted_table(ratios):
    return pd.DataFrame(
        {
            "layer": [f"l{i}" for i in range(len(ratios))],
            "stage": ["a", "a", "b", "b", "c", "c"][: len(ratios)],
            "depth": range(len(ratios)),
            "channels": [10] * len(ratios),
            "pruned": [int(r * 10) for r in ratios],
            "pruning_ratio": ratios,
        }
    )


def test_mean_std_rule_flags_the_clearly_less_pruned_layer():
    units, info = find_bottlenecks(crafted_table([0.5, 0.6, 0.5, 0.0, 0.6, 0.5]), rule="mean-std", k=1.0)
    assert (
        list(units[units.flagged].unit) == ["l3"]
        and units.iloc[0].unit == "l3"
        and units.iloc[0]["rank"] == 1
    )
    assert info["threshold"] == pytest.approx(info["mean"] - info["std"])
    assert "l3" in explain(units, info)


def test_least_rule_flags_the_n_least_pruned():
    units, _ = find_bottlenecks(crafted_table([0.5, 0.1, 0.5, 0.2, 0.6, 0.5]), rule="least", n=2)
    assert set(units[units.flagged].unit) == {"l1", "l3"}


def test_least_rule_never_flags_a_unit_pruned_more_than_the_mean():
    units, info = find_bottlenecks(
        crafted_table([0.2, 0.2, 0.4, 0.4, 0.6, 0.6]), level="stage", rule="least", n=3
    )
    assert list(units[units.flagged].unit) == ["a"] and "among those pruned less than the mean" in explain(
        units, info
    )


def test_the_evidence_says_below_or_above_the_mean_in_words():
    units, _ = find_bottlenecks(crafted_table([0.5, 0.6, 0.5, 0.0, 0.6, 0.5]))
    why = units.set_index("unit")["why"]
    assert "std below it -> bottleneck" in why["l3"] and "std above it" in why["l1"] and "+" not in why["l1"]


def test_stage_level_aggregates_channels():
    units, _ = find_bottlenecks(crafted_table([0.5, 0.5, 0.1, 0.1, 0.6, 0.6]), level="stage", k=1.0)
    assert list(units[units.flagged].unit) == ["b"] and units.set_index("unit").loc[
        "b", "pruning_ratio"
    ] == pytest.approx(0.1)


def test_uniform_network_has_no_bottleneck():
    units, info = find_bottlenecks(crafted_table([0.5] * 6))
    assert not units.flagged.any() and "no architectural bottleneck" in explain(units, info)


def test_compare_runs_gives_mean_and_std_over_trials():
    runs = [
        {"procedure": "expand-prune", "label": "", "test_acc": a, "params": 100, "macs": 10}
        for a in (0.9, 0.8)
    ]
    runs.append({"procedure": "train-prune", "label": "", "test_acc": 0.7, "params": 80, "macs": 8})
    table = compare_runs(runs).set_index("procedure")
    assert table.loc["expand-prune", "trials"] == 2 and table.loc[
        "expand-prune", "test_acc_mean"
    ] == pytest.approx(0.85)
    assert (
        table.loc["expand-prune", "test_acc_std"] == pytest.approx(0.0707, abs=1e-3)
        and table.loc["train-prune", "test_acc_std"] == 0
    )


def test_expand_pruning_end_to_end_through_the_cli(tmp_path, capsys):
    code = main(
        [
            "expand",
            "--model",
            "resnet20",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--samples",
            "60",
            "--ratio",
            "0.4",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["widen", "train", "analyze", "finetune"]
    assert list(stages["widen"]["factors"].values()) == [2.0]
    assert stages["finetune"]["params"] < stages["widen"]["params"] and 0 <= summary["test_acc"] <= 1
    assert (tmp_path / "run" / "final.pt").exists() and (tmp_path / "run" / "mask.json").exists()
    assert (
        tmp_path / "run" / "plain" / "trained.pt"
    ).exists()  # bottlenecks of the trained plain net, not an init
    assert "training the plain net first" in capsys.readouterr().err


def test_a_train_prune_run_to_a_latency_target_prunes_where_its_stored_profile_says(tmp_path, quiet_machine):
    from sosp_engine.saliency.analysis import AnalysisResult
    from sosp_engine.experiments.procedures import Experiment, ExperimentConfig
    from sosp_engine.latency.profile import LatencyProfile
    from sosp_engine.pruning.masks import load_mask

    # full width: convolutions, not Python overhead, set its latency, so a loaded machine still measures the drop
    config = config_from_dict(
        ExperimentConfig,
        dict(
            procedure="train-prune",
            model_spec="resnet20",
            epochs=1,
            finetune_epochs=0,
            method="magnitude",
            samples=20,
            unit="latency",
            ratio=0.03,
            device="cpu",
        ),
    )
    Experiment(config, tmp_path).run()
    profile = LatencyProfile.load(tmp_path / "analysis" / "latency.json")
    n_prunable = AnalysisResult.load(tmp_path / "analysis").n_prunable
    assert len(load_mask(tmp_path / "mask.json")) == profile.prefix_for(0.03, n_prunable)


def test_runs_of_different_configurations_are_never_averaged_as_trials():
    base = {"procedure": "train-prune", "label": "", "params": 100, "macs": 10}
    runs = [
        {**base, "test_acc": acc, "config": {"epochs": epochs, "seed": seed, "ratio": 0.5}}
        for acc, epochs, seed in ((0.9, 30, 0), (0.88, 30, 1), (0.3, 2, 0))
    ]
    table = compare_runs(runs).set_index("setup")
    assert table.loc["epochs=30", "trials"] == 2 and table.loc["epochs=2", "trials"] == 1
    assert table.loc["epochs=30", "test_acc_mean"] == pytest.approx(0.89)


def test_the_widening_plan_widens_the_picked_units_or_the_papers_choice():
    table = crafted_table([0.5, 0.1, 0.5, 0.2, 0.6, 0.5])
    paper = widening_plan("vgg19", table)  # up to five least pruned layers, none pruned more than the mean
    assert dict(zip(paper.unit, paper.factor)) == {
        "l1": 2.0,
        "l3": 2.0,
        "l0": 1.0,
        "l2": 1.0,
        "l5": 1.0,
        "l4": 1.0,
    }
    picked = widening_plan("vgg19", table, "stage", {"b"}, factor=3.0)
    assert dict(zip(picked.unit, picked.factor)) == {"a": 1.0, "b": 3.0, "c": 1.0}
    assert paper_widening("vgg19", table) == {u: 2.0 for u in paper[paper.factor == 2.0].unit}
