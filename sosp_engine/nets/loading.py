"""Model + data + weights in one call, and the structures found on them: what the CLI, jobs and UI all start from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .data import DataBundle, check_model_fits_data, load_data
from ..errors import CheckpointError
from . import build_model, load_weights, read_checkpoint
from ..pruning.pruned_models import reapply, recipe_of
from ..pruning.offered import find_structures
from ..pruning.structures import StructureSet


def default_preset(model_spec: str) -> str | None:
    """The paper's exclusions: the downsampling path of ResNets; nothing for other models."""
    spec = model_spec.strip()
    if spec.startswith("resnet"):
        return "cifar-resnet"
    if (
        spec.startswith("torchvision:resnet")
        or spec.startswith("torchvision:resnext")
        or spec.startswith("torchvision:wide_resnet")
    ):
        return "torchvision-resnet"
    return None


def resolve_preset(model_spec: str, preset: str | None) -> str | None:
    """'auto' -> the paper's default for the model, 'none' / None -> no preset, else the preset named."""
    if preset == "auto":
        return default_preset(model_spec)
    return None if preset in (None, "none") else preset


def example_input(data: DataBundle, batch: int = 1) -> torch.Tensor:
    """A random input batch of the data set's shape (for tracing and counting)."""
    return torch.randn(batch, *data.input_shape, generator=torch.Generator().manual_seed(0))


@dataclass
class Workbench:
    """A model on a data set with its prunable structures."""

    model_spec: str
    data: DataBundle
    model: nn.Module
    structures: StructureSet
    weights: str | None
    example: torch.Tensor
    recipe: dict | None = None  # set when the weights are a pruned checkpoint: how to rebuild its shape

    def fresh_model(self, seed: int) -> nn.Module:
        """A new seeded initialisation of this workbench's architecture (pruned to the same shape if it is pruned)."""
        torch.manual_seed(seed)
        model = build_model(self.model_spec, self.data.num_classes, self.data.input_shape[0])
        if self.recipe is not None:
            reapply(model, self.recipe, self.example)
        return model


def load_model(model_spec: str, data: DataBundle, weights: str | None) -> tuple[nn.Module, dict | None]:
    """Build the spec's model and load weights: a plain state_dict, or a pruned checkpoint (re-pruned, then loaded)."""
    model = build_model(model_spec, data.num_classes, data.input_shape[0])
    if weights is not None and not str(weights).strip():
        raise CheckpointError(
            "the weights path is empty: give a checkpoint file, or leave the option out for random init"
        )
    if not weights:
        return model, None
    checkpoint = read_checkpoint(weights)
    recipe = recipe_of(checkpoint)
    if recipe is not None:
        reapply(model, recipe, example_input(data))
    load_weights(model, weights, checkpoint)
    return model, recipe


def open_workbench(
    model_spec: str,
    data: DataBundle | str,
    weights: str | None = None,
    exclude: Sequence[str] = (),
    preset: str | None = "auto",
) -> Workbench:
    """Build the model for the data set, load weights if given, check shapes and find the prunable structures."""
    bundle = load_data(data) if isinstance(data, str) else data
    model, recipe = load_model(model_spec, bundle, weights)
    check_model_fits_data(model, bundle)
    x = example_input(bundle)
    structures = find_structures(model, x, exclude=exclude, preset=resolve_preset(model_spec, preset))
    return Workbench(model_spec, bundle, model, structures, weights, x, recipe)
