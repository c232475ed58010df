"""Pruned checkpoints that reopen: the weights of a physically pruned model with the recipe that rebuilds its shape."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ..atomic import save_atomically
from ..errors import CheckpointError
from .masks import prune_in_place
from .offered import find_structures
from .structures import StructureSet, architecture_signature

PRUNED_FORMAT = "sosp-pruned/1"


def pruning_recipe(
    model_spec: str,
    structures: StructureSet,
    mask: Iterable[str],
    preset: str | None,
    exclude: Sequence[str],
    earlier: dict | None = None,
) -> dict:
    """How to rebuild the pruned shape from the spec: each pruning step's architecture, exclusions and pruned keys.

    `earlier` is the recipe of an already pruned model that is pruned again; its steps come first.
    """
    index = structures.key_index()
    step = {
        "architecture": structures.signature,
        "preset": preset,
        "exclude": list(exclude),
        "pruned": sorted(set(mask), key=index.__getitem__),
    }
    return {
        "format": PRUNED_FORMAT,
        "model_spec": model_spec,
        "steps": [*(earlier or {}).get("steps", []), step],
    }


MAX_PRUNING_STEPS = 100  # each prune / finetune --save adds one
MAX_PRUNED_PER_STEP = 1_000_000


def _checkpoint(smaller: nn.Module, recipe: dict) -> dict:
    return {**recipe, "state_dict": {k: v.detach().cpu() for k, v in smaller.state_dict().items()}}


def pruned_checkpoint_bytes(smaller: nn.Module, recipe: dict) -> bytes:
    """The pruned checkpoint as bytes (for a download)."""
    buffer = io.BytesIO()
    torch.save(_checkpoint(smaller, recipe), buffer)
    return buffer.getvalue()


def save_pruned(path: str | Path, smaller: nn.Module, recipe: dict) -> Path:
    """Write the pruned model's state_dict with its recipe (plain containers: loadable with weights_only=True)."""
    return save_atomically(_checkpoint(smaller, recipe), path)


def recipe_of(checkpoint: object) -> dict | None:
    """The pruning recipe stored in a loaded checkpoint object, or None for a plain state_dict."""
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == PRUNED_FORMAT):
        return None
    steps = checkpoint.get("steps")
    if not isinstance(steps, list) or not all(
        isinstance(s, dict) and isinstance(s.get("pruned"), list) and isinstance(s.get("architecture"), str)
        for s in steps
    ):
        raise CheckpointError("the pruned checkpoint's recipe is damaged (its pruning steps are unreadable)")
    if len(steps) > MAX_PRUNING_STEPS or any(
        len(s["pruned"]) > MAX_PRUNED_PER_STEP
        or not all(isinstance(k, str) and len(k) <= 1000 for k in s["pruned"])
        for s in steps
    ):
        raise CheckpointError(
            f"the pruned checkpoint's recipe is larger than any this project writes (over {MAX_PRUNING_STEPS} "
            f"pruning steps, or over {MAX_PRUNED_PER_STEP:,} structures or an overlong name in one): not rebuilt"
        )
    return {k: v for k, v in checkpoint.items() if k != "state_dict"}


def reapply(model: nn.Module, recipe: dict, example_input: torch.Tensor) -> nn.Module:
    """Prune a freshly built unpruned `model` in place to the recipe's shape (weights are loaded afterwards)."""
    for step in recipe["steps"]:
        if architecture_signature(model) != step["architecture"]:
            raise CheckpointError(
                f"this pruned checkpoint was made from '{recipe.get('model_spec')}', another "
                "architecture than the model given: open it with that model spec"
            )
        if not step["pruned"]:
            continue  # a step that pruned nothing changes nothing: no trace needed
        structures = find_structures(model, example_input, step.get("exclude") or (), step.get("preset"))
        prune_in_place(model, structures, step["pruned"], example_input)
    return model
