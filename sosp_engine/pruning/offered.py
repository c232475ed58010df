"""What a model offers to prune: the structures the engine's tracer gives (structures.py), less the layers whose
channels pass an op of fixed sizes and whose pruning, measured, does not run or does not equal zeroing them."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .exactness import unfaithful_permutations
from .structures import StructureSet, traced_structures


def find_structures(
    model: nn.Module, example_input: torch.Tensor, exclude: Sequence[str] = (), preset: str | None = None
) -> StructureSet:
    """All prunable structures of `model`; the final classifier and layers matching `exclude` patterns are left out.
    A layer whose channels pass an op of fixed sizes is offered only where pruning it, measured, equals zeroing it."""
    structures = traced_structures(model, example_input, exclude, preset)
    if not structures.measured:
        return structures
    refused = unfaithful_permutations(model, structures, example_input)
    return traced_structures(model, example_input, exclude, preset, refused) if refused else structures
