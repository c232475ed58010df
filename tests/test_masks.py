import json

import pytest
import torch

from conftest import random_mask
from sosp_engine.errors import MaskError
from sosp_engine.pruning.masks import (
    compare_masks,
    layer_table,
    load_mask,
    mask_summary,
    save_mask,
    zeroed_copy,
)
from sosp_engine.nets import build_model
from sosp_engine.pruning.offered import find_structures

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet():
    model = build_model("resnet20")
    return model, find_structures(model, X, preset="cifar-resnet")


def test_layer_table_counts_kept_and_pruned_channels(resnet):
    _, structures = resnet
    table = layer_table(
        structures, {"layer1.0.conv1:0", "layer1.0.conv1:1", "layer1.0.conv1:2", "layer1.0.conv1:3"}
    )
    row = table.set_index("layer").loc["layer1.0.conv1"]
    assert (row.channels, row.kept, row.pruned, row.pruning_ratio) == (16, 12, 4, 0.25)
    assert row.params_after == 12 * 16 * 9 + 2 * 12 and row.params_before == 16 * 16 * 9 + 2 * 16


def test_layer_table_columns_and_order(resnet):
    _, structures = resnet
    table = layer_table(structures)
    assert list(table.depth) == list(range(len(table)))
    assert {"stage", "block", "macs_before", "macs_after", "kernel"} <= set(table.columns)
    assert table.stage.iloc[0].startswith("stage 1") and table.stage.iloc[-1].startswith("stage 3")


def test_zeroing_sets_in_weights_to_zero_and_keeps_the_original(resnet):
    model, structures = resnet
    zeroed = zeroed_copy(model, structures, {"layer1.0.conv1:2"})
    assert zeroed.layer1[0].conv1.weight[2].abs().sum() == 0 and zeroed.layer1[0].bn1.bias[2] == 0
    assert model.layer1[0].conv1.weight[2].abs().sum() > 0
    assert zeroed.layer1[0].conv2.weight[:, 2].abs().sum() > 0  # out-weights stay


def test_compare_identical_masks_is_full_overlap(resnet):
    _, structures = resnet
    mask = random_mask(structures, 0.4)
    table, overall = compare_masks(structures, mask, mask)
    assert overall["jaccard"] == 1.0 and (table.jaccard == 1.0).all() and (table.ratio_difference == 0).all()


def test_compare_disjoint_masks_per_layer(resnet):
    _, structures = resnet
    a = {"layer1.0.conv1:0", "layer1.0.conv1:1"}
    b = {"layer1.0.conv1:1", "layer1.0.conv1:2", "layer1.0.conv1:3", "layer1.1.conv1:0"}
    table, overall = compare_masks(structures, a, b)
    row = table.set_index("layer").loc["layer1.0.conv1"]
    assert row.jaccard == pytest.approx(1 / 4) and row.ratio_difference == pytest.approx(1 / 16)
    assert overall["jaccard"] == pytest.approx(1 / 5) and overall["shared"] == 1


def test_compare_reports_the_params_and_macs_each_mask_removes(resnet):
    _, structures = resnet
    a, b = random_mask(structures, 0.2, seed=1), random_mask(structures, 0.6, seed=2)
    _, overall = compare_masks(structures, a, b)
    summary_a, summary_b = mask_summary(structures, a), mask_summary(structures, b)
    assert overall["param_ratio_a"] == pytest.approx(summary_a["param_ratio"])
    assert (
        overall["mac_ratio_b"] == pytest.approx(summary_b["mac_ratio"])
        and overall["mac_ratio_b"] > overall["mac_ratio_a"]
    )


def test_mask_json_round_trip(tmp_path, resnet):
    _, structures = resnet
    mask = random_mask(structures, 0.5)
    path = save_mask(tmp_path / "m.json", structures, mask, method="random")
    assert load_mask(path, structures) == mask
    assert json.loads(path.read_text())["meta"]["method"] == "random"


def test_mask_from_init_applies_to_other_weights_of_the_architecture(tmp_path, resnet):
    _, structures = resnet
    path = save_mask(tmp_path / "m.json", structures, random_mask(structures, 0.5))
    torch.manual_seed(99)
    trained = build_model("resnet20")
    other = find_structures(trained, X, preset="cifar-resnet")
    assert mask_summary(other, load_mask(path, other))["structures_pruned"] > 0


def test_mask_for_another_architecture_is_refused(tmp_path, resnet):
    _, structures = resnet
    path = save_mask(tmp_path / "m.json", structures, random_mask(structures, 0.5))
    vgg = find_structures(build_model("vgg19"), X)
    with pytest.raises(MaskError, match="another architecture"):
        load_mask(path, vgg)


@pytest.mark.parametrize(
    "content,fragment", [("{not json", "not valid JSON"), ('{"a": 1}', "not a SOSP Lab mask")]
)
def test_bad_mask_files_are_refused(tmp_path, content, fragment):
    (tmp_path / "m.json").write_text(content)
    with pytest.raises(MaskError, match=fragment):
        load_mask(tmp_path / "m.json")


def test_ratio_profiles_give_each_mask_its_layer_ratios(resnet):
    from sosp_engine.pruning.masks import ratio_profiles

    _, structures = resnet
    a, b, c = (random_mask(structures, r, seed=s) for r, s in ((0.2, 1), (0.5, 2), (0.7, 3)))
    table = ratio_profiles(structures, {"a": a, "b": b, "c": c})
    assert list(table.columns[-3:]) == ["a", "b", "c"]
    assert table["b"].tolist() == layer_table(structures, b)["pruning_ratio"].tolist()
