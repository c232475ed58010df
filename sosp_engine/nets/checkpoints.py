"""Load untrusted checkpoints safely (weights_only=True), unwrapping the usual containers."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import NotAFileError, load_verified
from ..errors import CheckpointError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def _unwrap(obj: object) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            "the checkpoint holds no state_dict: save it with torch.save(model.state_dict(), path)"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"the checkpoint dict has no tensors (keys: {sorted(obj)[:10]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


ACCEPTED_CHECKPOINTS = (
    "Accepted: a state_dict saved with torch.save (bare, {'state_dict': ...} or {'model': ...}, 'module.' "
    "prefixes allowed) or a pruned checkpoint written by prune --save, finetune --save or the Ratios page"
)


def read_checkpoint(path: str | Path) -> object:
    """The object stored in a checkpoint file, read with `weights_only=True` (no code runs)."""
    path = Path(path).expanduser()
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return load_verified(path)
    except NotAFileError as exc:
        raise CheckpointError(f"checkpoint {exc} (.pt / .pth)") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' is a link to a file that does not exist") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. {ACCEPTED_CHECKPOINTS}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a checkpoint file with `weights_only=True`."""
    return _unwrap(read_checkpoint(path))


def load_weights(model: nn.Module, path: str | Path, checkpoint: object = None) -> nn.Module:
    """Load a checkpoint (or its already-read object) into `model` in place; a key mismatch is a CheckpointError."""
    state = _unwrap(checkpoint) if checkpoint is not None else read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {'; '.join(misshaped[:8])}")
        raise CheckpointError(
            f"checkpoint '{path}' does not fit the model: "
            + " | ".join(parts)
            + ". Check the model spec (architecture, widths, num_classes, in_channels)."
        )
    mistyped = [k for k in own if own[k].is_floating_point() and not state[k].is_floating_point()]
    if mistyped:
        kinds = sorted({_dtype_kind(state[k].dtype) for k in mistyped})
        raise CheckpointError(
            f"checkpoint '{path}' holds {' and '.join(kinds)} tensors where the model has real "
            f"float weights: {', '.join(f'{k} ({state[k].dtype})' for k in mistyped[:5])}; it is "
            "not a weights file of this model"
        )
    nonfinite = [k for k in own if state[k].is_floating_point() and not bool(state[k].isfinite().all())]
    if nonfinite:
        raise CheckpointError(
            f"checkpoint '{path}' holds NaN or infinite values in {', '.join(nonfinite[:5])}"
            f"{' ...' if len(nonfinite) > 5 else ''}: the training that wrote it diverged"
        )
    negative = [k for k in own if k.endswith("running_var") and bool((state[k] < 0).any())]
    if negative:
        raise CheckpointError(
            f"checkpoint '{path}' holds negative BatchNorm variances in {', '.join(negative[:5])}: "
            "a variance is never negative, so the file is damaged or was edited"
        )
    if (
        getattr(state, "_metadata", None) is None
    ):  # a re-packed state_dict: assume this model's module versions
        state = OrderedDict(state)
        state._metadata = getattr(own, "_metadata", None)
    model.load_state_dict(state)
    return model


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameters and buffers, identifying the weights an analysis ran on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


WEIGHTED_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def zero_layers(model: nn.Module) -> list[str]:
    """The linear and conv layers whose weight (and bias) are all zero: such a layer passes no gradient back, as
    torchvision's ViT heads at their initialisation."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, WEIGHTED_LAYERS)
        and not bool(m.weight.any())
        and (m.bias is None or not bool(m.bias.any()))
    ]
