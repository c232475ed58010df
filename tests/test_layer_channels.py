"""The per-channel table of a layer: its saliency parts are the terms that enter the saliency, so they add up to it."""

import torch

from sosp_engine.saliency.attribution import layer_channels


def test_the_first_and_second_order_parts_add_up_to_the_saliency():
    first = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    second = torch.tensor([-0.4, 0.6, 0.2], dtype=torch.float64)
    saliency = first.abs() + 0.5 * second.abs()
    frame = layer_channels(["conv:0", "conv:1", "other:0"], saliency, "conv", {"conv:1"}, first, second)
    assert frame["structure"].tolist() == ["0", "1"] and frame["status"].tolist() == ["kept", "pruned"]
    assert (frame["first_order_part"] + frame["second_order_part"]).tolist() == frame[
        "sosp_saliency"
    ].tolist()
    assert frame["second_order_part"].tolist() == [0.2, 0.3]


def test_a_method_without_parts_shows_the_saliency_alone():
    frame = layer_channels(["conv:0"], torch.tensor([1.0]), "conv", set())
    assert "first_order_part" not in frame and frame["sosp_rank"].tolist() == [1.0]
