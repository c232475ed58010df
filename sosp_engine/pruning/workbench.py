"""A model setup opened: the net on its data with its weights and prunable structures, which answers the follow-up
questions (a fresh init, the structures of another copy, a mask pruned into a model with its recipe) itself."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError, MaskError
from ..nets import build_model, load_weights, read_checkpoint
from ..nets.data import DataBundle, check_model_fits_data, example_input, load_data
from ..nets.setup import ModelSetup
from .masks import pruned_copy
from .offered import find_structures
from .pruned_models import pruning_recipe, reapply, recipe_of
from .structures import StructureSet
from .surgery import build_widened, params_of, uniform_factor


def build_for(model_spec: str, data: DataBundle) -> nn.Module:
    """A randomly initialised net of the spec, with the data set's classes and input channels."""
    return build_model(model_spec, data.num_classes, data.input_shape[0])


def structures_under(setup: ModelSetup, model: nn.Module, example: torch.Tensor) -> StructureSet:
    """The prunable structures of `model` under the setup's exclusions and preset."""
    return find_structures(model, example, exclude=setup.exclude, preset=setup.preset_name)


@dataclass
class PrunedModel:
    """A physically pruned copy and the recipe that rebuilds its shape from the spec (saved with its weights)."""

    model: nn.Module
    recipe: dict
    mask: set[str]


@dataclass
class Workbench:
    """A model on a data set with its prunable structures, opened from (and keeping) its `ModelSetup`."""

    setup: ModelSetup
    data: DataBundle
    model: nn.Module
    structures: StructureSet
    example: torch.Tensor
    recipe: dict | None = None  # set when the weights are a pruned checkpoint: how to rebuild its shape
    timings: dict[str, float] = field(default_factory=dict)  # seconds of each stage of opening it

    @property
    def model_spec(self) -> str:
        return self.setup.model_spec

    def fresh_model(self, seed: int) -> nn.Module:
        """A new seeded initialisation of this workbench's architecture (pruned to the same shape if it is pruned)."""
        torch.manual_seed(seed)
        model = build_for(self.setup.model_spec, self.data)
        if self.recipe is not None:
            reapply(model, self.recipe, self.example)
        return model

    def prune(self, mask: set[str], model: nn.Module | None = None) -> PrunedModel:
        """The workbench's net (or `model`, a copy with the same structures) without the masked structures, with the
        recipe that reopens it (`--model SPEC --weights pruned.pt`), chained after the recipe it was loaded with."""
        smaller = pruned_copy(model if model is not None else self.model, self.structures, mask, self.example)
        runs(smaller, self.example)
        recipe = pruning_recipe(
            self.setup.model_spec,
            self.structures,
            mask,
            self.setup.preset_name,
            self.setup.exclude,
            self.recipe,
        )
        return PrunedModel(smaller, recipe, set(mask))


def runs(smaller: nn.Module, example: torch.Tensor) -> None:
    """Refuse a pruned net that does not run on the example input (before anything of it is written or trained)."""
    modes = {m: m.training for m in smaller.modules()}
    try:
        with torch.no_grad():
            smaller.eval()(example.to(next(smaller.parameters()).device))
    except RuntimeError as exc:
        raise MaskError(
            f"the net pruned by this mask does not run ({str(exc).splitlines()[0][:160]}); nothing was written. "
            "Exclude the layers of this mask whose module code fixes their width (--exclude), or prune others"
        ) from None
    finally:
        for m, mode in modes.items():
            m.training = mode


def expansion_sizes(workbench: Workbench, factors: dict[str, float]) -> tuple[int, int, float, int]:
    """(plain params, params widened by `factors`, the one factor for every layer giving that size, its params)."""
    data = workbench.data
    wide, _ = build_widened(
        workbench.model_spec,
        data.num_classes,
        data.input_shape[0],
        workbench.structures,
        factors,
        workbench.example,
    )
    expanded = params_of(wide)
    factor, matched = uniform_factor(
        workbench.model_spec,
        data.num_classes,
        data.input_shape[0],
        workbench.structures,
        expanded,
        workbench.example,
    )
    return params_of(workbench.model), expanded, factor, matched


def load_model(setup: ModelSetup, data: DataBundle) -> tuple[nn.Module, dict | None]:
    """Build the setup's model and load its weights: a plain state_dict, or a pruned checkpoint (re-pruned, then
    loaded)."""
    model = build_for(setup.model_spec, data)
    if setup.weights is not None and not str(setup.weights).strip():
        raise CheckpointError(
            "the weights path is empty: give a checkpoint file, or leave the option out for random init"
        )
    if not setup.weights:
        return model, None
    checkpoint = read_checkpoint(setup.weights)
    recipe = recipe_of(checkpoint)
    if recipe is not None:
        reapply(model, recipe, example_input(data))
    load_weights(model, setup.weights, checkpoint)
    return model, recipe


def open_workbench(setup: ModelSetup, data: DataBundle | None = None) -> Workbench:
    """Build the setup's model for its data set (or the `data` already loaded), load its weights, check shapes and
    find the prunable structures."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    bundle = data if data is not None else load_data(setup.data_spec)
    timings["data"], start = time.perf_counter() - start, time.perf_counter()
    model, recipe = load_model(setup, bundle)
    check_model_fits_data(model, bundle)
    timings["model"], start = time.perf_counter() - start, time.perf_counter()
    x = example_input(bundle)
    structures = structures_under(setup, model, x)
    timings["structures"] = time.perf_counter() - start
    return Workbench(setup, bundle, model, structures, x, recipe, timings)
