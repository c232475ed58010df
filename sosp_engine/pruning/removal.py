"""Physical removal of structures: every module dimension and bare parameter the structures name loses those
channels, and what the module's code reads follows (channel counts, groups, norm shapes, attention heads)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import MaskError
from .channel_trace import NORM_TYPES, TRANSPOSED_TYPES, is_depthwise
from .structures import ProducerSlice, StructureSet


def _removed(pieces: Iterable[ProducerSlice], pruned: torch.Tensor) -> dict[str, set[int]]:
    """Module -> the channels of it that the pruned structures hold."""
    found: dict[str, set[int]] = {}
    for piece in pieces:
        hit = pruned[piece.structure]
        if bool(hit.any()):
            found.setdefault(piece.module, set()).update(piece.channels[hit].tolist())
    return found


def _kept(size: int, removed: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def _cut(module: nn.Module, name: str, axis: int, keep: torch.Tensor) -> None:
    """Keep only `keep` along `axis` of a parameter or buffer, as the same kind of tensor."""
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        return
    smaller = value.detach().index_select(axis, keep.to(value.device)).clone()
    if isinstance(value, nn.Parameter):
        setattr(module, name, nn.Parameter(smaller, requires_grad=value.requires_grad))
    else:
        setattr(module, name, smaller)


def _local_positions(name: str, channels: set[int], per_group: int, groups: int) -> torch.Tensor:
    """The positions within each group that stay, where every group loses the same ones."""
    local = {c % per_group for c in channels}
    if len(channels) != len(local) * groups:
        raise MaskError(
            f"the mask removes unequal channels from the groups of {name}; the structures keep them equal"
        )
    return _kept(per_group, local)


def _cut_conv(name: str, m: nn.Module, out_removed: set[int], in_removed: set[int]) -> None:
    if is_depthwise(m):
        _cut(m, "weight", 0, _kept(m.out_channels, out_removed))
        _cut(m, "bias", 0, _kept(m.out_channels, out_removed))
        m.in_channels -= len(in_removed)
        m.groups = m.in_channels
        m.out_channels -= len(out_removed)
        return
    if isinstance(m, TRANSPOSED_TYPES):  # weight (in, out / groups, ...)
        _cut(m, "weight", 0, _kept(m.in_channels, in_removed))
        if out_removed:
            keep = _local_positions(name, out_removed, m.out_channels // m.groups, m.groups)
            _cut(m, "weight", 1, keep)
    else:  # weight (out, in / groups, ...)
        _cut(m, "weight", 0, _kept(m.out_channels, out_removed))
        if in_removed:
            _cut(m, "weight", 1, _local_positions(name, in_removed, m.in_channels // m.groups, m.groups))
    _cut(m, "bias", 0, _kept(m.out_channels, out_removed))
    m.in_channels -= len(in_removed)
    m.out_channels -= len(out_removed)


def _cut_norm(m: nn.Module, removed: set[int]) -> None:
    channels = m.weight.shape[0] if getattr(m, "weight", None) is not None else m.running_mean.shape[0]
    keep = _kept(channels, removed)
    for name in ("weight", "bias", "running_mean", "running_var"):
        _cut(m, name, 0, keep)
    left = channels - len(removed)
    if isinstance(m, nn.LayerNorm):
        m.normalized_shape = (left,)
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = left
    else:
        m.num_features = left


def _cut_module(name: str, m: nn.Module, out_removed: set[int], in_removed: set[int]) -> None:
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d) + TRANSPOSED_TYPES):
        _cut_conv(name, m, out_removed, in_removed)
    elif isinstance(m, nn.Linear):
        _cut(m, "weight", 0, _kept(m.out_features, out_removed))
        _cut(m, "weight", 1, _kept(m.in_features, in_removed))
        _cut(m, "bias", 0, _kept(m.out_features, out_removed))
        m.out_features -= len(out_removed)
        m.in_features -= len(in_removed)
    elif isinstance(m, NORM_TYPES):
        _cut_norm(m, out_removed)
    else:
        raise MaskError(
            f"{name} ({type(m).__name__}) holds pruned channels, and the engine cannot cut that module"
        )


def remove_structures(model: nn.Module, structures: StructureSet, pruned: torch.Tensor) -> None:
    """Cut the structures flagged in `pruned` (bool, S) out of `model` in place."""
    out_removed = _removed(structures.producers, pruned)
    in_removed = _removed(structures.consumed, pruned)
    with torch.no_grad():
        for name in sorted(set(out_removed) | set(in_removed)):
            m = model.get_submodule(name)
            _cut_module(name, m, out_removed.get(name, set()), in_removed.get(name, set()))
        for name, removed in _removed(structures.parameters, pruned).items():
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            before = getattr(module, attribute).shape
            size = before[structures.parameter_axes[name]]
            _cut(module, attribute, structures.parameter_axes[name], _kept(size, removed))
            _follow_view_shapes(module, before, size, size - len(removed))
    for name, heads in structures.heads.items():
        _drop_heads(model.get_submodule(name), sum(bool(pruned[s]) for s in heads))


def _follow_view_shapes(module: nn.Module, before: torch.Size, size: int, left: int) -> None:
    """A module that views its parameter to a stored shape (poolformer's Scale: `self.shape = (dim, 1, 1)`): a tuple
    attribute of the parameter's size holding the old channel count once gets the new count."""
    for attribute, value in vars(module).items():
        if (
            isinstance(value, tuple)
            and value
            and all(isinstance(v, int) for v in value)
            and value.count(size) == 1
            and int(torch.tensor(value).prod()) == before.numel()
        ):
            setattr(module, attribute, tuple(left if v == size else v for v in value))


# what attention modules read of their width besides num_heads (timm: attn_dim; others: all_head_size, inner_dim)
HEAD_WIDTH_ATTRIBUTES = ("attn_dim", "all_head_dim", "all_head_size", "inner_dim")


def _drop_heads(module: nn.Module, gone: int) -> None:
    """An attention module that lost `gone` whole heads: its head count and the widths derived from it."""
    heads = getattr(module, "num_heads", None)
    if not gone or not isinstance(heads, int):
        return
    for attribute in HEAD_WIDTH_ATTRIBUTES:
        width = getattr(module, attribute, None)
        if isinstance(width, int) and width % heads == 0:
            setattr(module, attribute, width // heads * (heads - gone))
    module.num_heads = heads - gone
