"""The latency normalisation: per-layer seconds per channel measured on the device, and an order ranked by saliency per
second saved."""

import pytest
from dataclasses import replace

import torch
from torch import nn

from sosp_engine.saliency import analysis
from sosp_engine.saliency.analysis import AnalysisConfig, AnalysisResult, run_analysis
from sosp_engine.cli.main import main
from sosp_engine.errors import AnalysisError
from sosp_engine.latency.profile import LatencyTiming
from sosp_engine.latency.layers import (
    COST_FLOOR_SHARE,
    LayerLatency,
    measure_layer_latency,
    saved_per_channel,
)
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.saliency.selection import order_by_saliency
from sosp_engine.pruning.offered import find_structures
from sosp_engine.pruning.surgery import resized_module


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def table_for(structures, per_channel) -> LayerLatency:
    names = [m.name for m in structures.modules]
    return LayerLatency("cpu", 1, 1, names, [0.0] * len(names), list(per_channel))


def test_every_conv_linear_and_norm_is_timed_with_each_channel_dimension_halved():
    model, example = tiny_net().eval(), torch.randn(1, 3, 8, 8)
    structures = find_structures(model, example)
    table = measure_layer_latency(model, structures, example, LatencyTiming(batch=4, repeats=2, warmup=1))
    assert (
        table.unmeasured == [] and table.batch == 4 and len(table.per_channel) == 2 * len(structures.modules)
    )
    assert all(s > 0 for s in table.seconds)
    # conv 0's outputs, norm 1, conv 3's inputs and outputs, norm 4, the linear head's inputs (a norm has one dimension)
    assert table.timed_dimensions == 6
    slopes = dict(zip(table.modules, zip(table.per_channel[0::2], table.per_channel[1::2])))
    assert slopes["1"][0] == 0.0 and slopes["4"][0] == 0.0


def test_only_channel_dimensions_some_structure_narrows_are_timed_in_the_models_precision():
    model, example = tiny_net().double().eval(), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    structures = find_structures(model, example)
    table = measure_layer_latency(model, structures, example, LatencyTiming(repeats=1, warmup=0))
    slopes = dict(zip(table.modules, zip(table.per_channel[0::2], table.per_channel[1::2])))
    assert table.unmeasured == [] and table.timed_dimensions == 6
    assert (
        slopes["0"][0] == 0.0 and slopes["8"][1] == 0.0
    )  # the image's channels and the classes are never pruned


def test_a_structures_seconds_sum_its_channels_slopes_over_every_module_it_narrows():
    model, example = tiny_net().eval(), torch.randn(1, 3, 8, 8)
    structures = find_structures(model, example)
    per_channel = torch.rand(
        2 * len(structures.modules), dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    saved = table_for(structures, per_channel.tolist()).structure_seconds(structures)
    assert torch.allclose(saved, structures.removal @ per_channel)


def test_a_structure_measured_slower_when_removed_costs_the_floor_and_ranks_last_at_equal_saliency():
    model, example = tiny_net().eval(), torch.randn(1, 3, 8, 8)
    structures = find_structures(model, example)
    per_channel = [1e-4] * (2 * len(structures.modules))
    second = [m.name for m in structures.modules].index("3")
    per_channel[
        2 * second + 1
    ] = -1.0  # halving conv "3"'s outputs measured slower (a library's narrow kernel)
    saved = table_for(structures, per_channel).structure_seconds(structures)
    slower = structures.removal[:, 2 * second + 1] > 0
    assert bool((saved[slower] == COST_FLOOR_SHARE * saved[~slower].mean()).all())
    order, n = order_by_saliency(torch.ones(structures.num_structures), structures, cap=1.0, normalize=saved)
    flags = [bool(slower[s]) for s in order[:n].tolist()]
    assert any(flags) and flags == sorted(flags)  # every cheaper structure is taken before any slower one


def test_a_time_saved_beyond_the_timing_noise_counts_per_removed_channel():
    full, narrower = [1.00, 1.02, 0.98, 1.01, 0.99], [0.60, 0.61, 0.59, 0.62, 0.58]
    assert saved_per_channel(full, narrower, 4) == pytest.approx(0.1)


def test_a_time_difference_within_the_timing_noise_counts_as_no_saving():
    full, narrower = [1.00, 1.30, 0.80, 1.20, 0.90], [0.95, 1.25, 0.85, 1.10, 0.98]
    assert saved_per_channel(full, narrower, 4) == 0.0


def test_timings_that_resolve_no_channel_cost_are_a_clear_error_not_an_order_by_chance():
    model, example = tiny_net().eval(), torch.randn(1, 3, 8, 8)
    structures = find_structures(model, example)
    with pytest.raises(AnalysisError, match="larger latency batch, or normalise by MACs"):
        table_for(structures, [0.0] * (2 * len(structures.modules))).structure_seconds(structures)


def test_a_module_that_cannot_be_rebuilt_narrower_is_listed_as_unmeasured_not_an_error():
    class ChannelsFirstLayerNorm(nn.LayerNorm):  # like timm's LayerNorm2d: normalises NCHW over the channels
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ChannelsFirstLayerNorm(8), nn.Conv2d(8, 4, 3)).eval()
    example = torch.randn(1, 3, 8, 8)
    structures = find_structures(model, example)
    table = measure_layer_latency(model, structures, example, LatencyTiming(repeats=1, warmup=0))
    assert table.unmeasured == ["1"] and table.timed_dimensions == 2  # conv 0's outputs, conv 2's inputs


def test_a_table_of_another_models_layers_is_refused():
    model, example = tiny_net().eval(), torch.randn(1, 3, 8, 8)
    structures = find_structures(model, example)
    with pytest.raises(Exception, match="another model"):
        LayerLatency("cpu", 1, 1, ["x"], [0.0], [0.0, 0.0]).structure_seconds(structures)


def test_given_costs_must_be_one_positive_number_per_structure():
    model, example = tiny_net().eval(), torch.randn(1, 3, 8, 8)
    structures = find_structures(model, example)
    ones = torch.ones(structures.num_structures)
    for costs in (ones[:-1], torch.cat([ones[:-1], torch.zeros(1)])):
        with pytest.raises(AnalysisError, match="positive numbers"):
            order_by_saliency(ones, structures, normalize=costs)


def test_resizing_keeps_a_conv1d_its_kind_and_settings():
    conv = resized_module(nn.Conv1d(8, 6, 5, stride=2, padding=2, bias=False), 4, 3)
    assert type(conv) is nn.Conv1d and (conv.in_channels, conv.out_channels) == (4, 3)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((5,), (2,), (2,), None)


def test_an_analysis_normalised_by_latency_times_the_layers_once_and_stores_its_setting(
    tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(
        analysis,
        "measure_layer_latency",
        lambda model, structures, example, timing, *a: (
            calls.append(timing.batch)
            or measure_layer_latency(model, structures, example, replace(timing, repeats=1, warmup=0), *a)
        ),
    )
    wb = open_workbench(ModelSetup("resnet20", "synthetic:3,8,8:10"))
    config = AnalysisConfig(
        method="sosp-h", samples=8, batch_size=4, normalize="latency", latency_batch=2, memory_budget_gb=4.0
    )
    result = run_analysis(wb, config)
    assert result.timings["layer_latency"] > 0 and calls == [2]  # not again for each memory probe
    assert "at batch 2" in result.layer_latency and "resolved above the timing noise" in result.layer_latency
    assert sorted(result.pruning_order.tolist()) == list(range(wb.structures.num_structures))
    again = AnalysisResult.load(result.save(tmp_path / "a"))
    assert (again.config.normalize, again.config.latency_batch, again.config.latency_device) == (
        "latency",
        2,
        None,
    )
    assert again.layer_latency == result.layer_latency


def test_a_latency_batch_below_one_is_refused():
    with pytest.raises(AnalysisError, match="latency_batch: .* greater than or equal to 1 \\(got 0\\)"):
        AnalysisConfig(normalize="latency", latency_batch=0).validate()


def test_analyze_normalised_by_latency_times_on_the_latency_device_and_batch(tmp_path):
    out = tmp_path / "a"
    assert (
        main(
            [
                "analyze",
                "--model",
                "resnet20",
                "--data",
                "synthetic:3,8,8:10",
                "--samples",
                "8",
                "--normalize",
                "latency",
                "--latency-device",
                "cpu",
                "--latency-batch",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    config = AnalysisResult.load(out).config
    assert (config.normalize, config.latency_device, config.latency_batch) == ("latency", "cpu", 3)
