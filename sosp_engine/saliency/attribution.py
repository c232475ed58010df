"""First-order channel attributions with captum, to set beside SOSP's second-order saliencies."""

from __future__ import annotations

import pandas as pd
import torch
from captum.attr import LayerGradientXActivation
from torch import nn

from ..pruning.structures import StructureSet


def channel_attribution(
    model: nn.Module,
    structures: StructureSet,
    layer_name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 100,
) -> torch.Tensor:
    """|mean over samples of gradient x activation| of the true-class logit, per channel of one layer's root module."""
    module = model.get_submodule(layer_name)
    was_training = model.training
    model.eval()
    attribution = LayerGradientXActivation(model, module)
    total = None
    for start in range(0, len(x), batch_size):
        attr = attribution.attribute(
            x[start : start + batch_size], target=y[start : start + batch_size].tolist()
        )
        dim = -1 if isinstance(module, nn.Linear) else 1
        per_channel = attr.movedim(dim, 1).reshape(attr.shape[0], attr.shape[dim], -1).sum(2).sum(0).detach()
        total = per_channel if total is None else total + per_channel
    model.train(was_training)
    return (total / len(x)).abs().double()


def layer_channels(
    keys: list[str],
    saliency: torch.Tensor,
    layer_name: str,
    mask: set[str],
    first_order: torch.Tensor | None = None,
    second_order: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Per structure of one layer: pruned or kept by `mask`, the saliency, its first- and second-order parts where the
    method has them, as they enter the saliency, so the two add up to it (|theta_s . g| and 1/2 |theta_s . H
    theta_struc| for SOSP-H, 1/2 |theta_s H_GN theta_s| for SOSP-I's second), and its rank in the layer (1 = least
    salient, pruned first)."""
    index = [i for i, key in enumerate(keys) if key.rsplit(":", 1)[0] == layer_name]
    frame = pd.DataFrame(
        {
            "structure": [keys[i].rsplit(":", 1)[1] for i in index],
            "status": ["pruned" if keys[i] in mask else "kept" for i in index],
            "sosp_saliency": saliency[index].tolist(),
        }
    )
    for name, part, weight in (
        ("first_order_part", first_order, 1.0),
        ("second_order_part", second_order, 0.5),
    ):
        if part is not None:
            frame[name] = (weight * part[index].abs()).tolist()
    frame["sosp_rank"] = frame.sosp_saliency.rank(method="average")
    return frame


def saliency_vs_attribution(
    keys: list[str],
    saliency: torch.Tensor,
    structures: StructureSet,
    layer_name: str,
    attribution: torch.Tensor,
    mask: set[str],
) -> pd.DataFrame:
    """Per structure of one layer: SOSP saliency, first-order attribution (summed over the structure's channels),
    both ranks (1 = least salient) and whether the mask prunes it."""
    layer = next(l for l in structures.layers if l.name == layer_name)
    frame = layer_channels(keys, saliency, layer_name, mask)
    frame["first_order_attribution"] = [
        float(attribution[channels].sum()) for channels in layer.structure_channels
    ]
    frame["attribution_rank"] = frame.first_order_attribution.rank(method="average")
    return frame
