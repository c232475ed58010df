"""Count parameters and MACs of a concrete model by running it once (convs and linears; the paper's App. D
convention)."""

from __future__ import annotations

import torch
from torch import nn

from .structures import forward_records, module_info


def count_params(model: nn.Module) -> int:
    """All parameters of the model."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of convolutions and linear layers for one sample of `example_input`'s shape."""
    order, shapes = forward_records(model, example_input[:1])
    total = 0.0
    for name in order:
        info = module_info(name, model.get_submodule(name), shapes[name])
        total += info.macs(info.in_channels, info.out_channels)
    return int(round(total))
