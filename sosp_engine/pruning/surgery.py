"""Widening: zoo models through their width settings (a new spec), any other model through its dependency groups."""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from ..errors import ModelSpecError
from ..nets import build_model
from ..nets.densenet_cifar import CifarDenseNet
from ..nets.registry import ZOO_PATTERN
from ..nets.resnet_cifar import CifarResNet
from ..nets.vgg_cifar import CifarVGG
from .channel_trace import is_depthwise
from .structures import StructureSet


def _width(value: int, factor: float) -> int:
    return max(1, int(round(value * factor)))


def _stage_index(structures: StructureSet, label: str) -> int:
    stages = list(dict.fromkeys(layer.stage for layer in structures.layers))
    if label not in stages:
        raise ModelSpecError(f"unknown stage '{label}'; stages: {stages}")
    return stages.index(label)


def widened_spec(
    model_spec: str, model: nn.Module, structures: StructureSet, factors: Mapping[str, float]
) -> str:
    """A zoo spec whose widths are multiplied by `factors`, keyed by layer names or stage labels."""
    name = ZOO_PATTERN.match(model_spec.strip()).group(1)
    if isinstance(model, CifarResNet):
        stages = [model.layer1, model.layer2, model.layer3]
        stage_w = [s[0].conv2.out_channels for s in stages]
        blocks = [b for s in stages for b in s]
        inner = [b.conv1.out_channels for b in blocks]
        block_names = [f"layer{i + 1}.{j}" for i, s in enumerate(stages) for j in range(len(s))]
        for key, f in factors.items():
            if key.startswith("stage"):
                i = _stage_index(structures, key)
                stage_w[i] = _width(stage_w[i], f)
                inner = [
                    _width(w, f) if b.startswith(f"layer{i + 1}.") else w for w, b in zip(inner, block_names)
                ]
            elif key == "conv1":
                stage_w[0] = _width(stage_w[0], f)
            elif key.endswith(".conv1") and key[:-6] in block_names:
                j = block_names.index(key[:-6])
                inner[j] = _width(inner[j], f)
            else:
                raise ModelSpecError(
                    f"cannot widen '{key}' of {name}: use a stage label, conv1 or layerK.B.conv1"
                )
        return f"{name}:widths={','.join(map(str, stage_w))};inner={','.join(map(str, inner))}"
    if isinstance(model, CifarVGG):
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        widths = [model.get_submodule(n).out_channels for n in convs]
        for key, f in factors.items():
            targets = (
                [l.name for l in structures.layers if l.stage == key] if key.startswith("stage") else [key]
            )
            for t in targets:
                if t not in convs:
                    raise ModelSpecError(f"cannot widen '{t}' of vgg19: not a conv layer")
                widths[convs.index(t)] = _width(widths[convs.index(t)], f)
        return f"vgg19:widths={','.join(map(str, widths))}"
    if isinstance(model, CifarDenseNet):
        growth = [
            model.block1[0].conv.out_channels,
            model.block2[0].conv.out_channels,
            model.block3[0].conv.out_channels,
        ]
        for key, f in factors.items():
            if key.startswith("stage"):
                i = _stage_index(structures, key)
            elif key.startswith("block") and key.endswith(".conv"):
                i = int(key[5]) - 1
            else:
                raise ModelSpecError(
                    f"cannot widen '{key}' of densenet40: use a stage label or blockK.J.conv (widens block K)"
                )
            growth[i] = _width(growth[i], f)
        return f"densenet40:growth={','.join(map(str, growth))}"
    raise ModelSpecError(f"'{model_spec}' is not a zoo model")


def resized_module(module: nn.Module, in_ch: int, out_ch: int) -> nn.Module:
    """A fresh module of `module`'s kind and settings with other channel counts (convs, linears, norms)."""
    conv = next((t for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, t)), None)
    if conv is not None:
        groups = in_ch if is_depthwise(module) else module.groups
        return conv(
            in_ch,
            out_ch,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            groups,
            module.bias is not None,
            module.padding_mode,
        )
    if isinstance(module, nn.Linear):
        return nn.Linear(in_ch, out_ch, module.bias is not None)
    norm = next((t for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) if isinstance(module, t)), None)
    if norm is not None:
        return norm(out_ch, module.eps, module.momentum, module.affine, module.track_running_stats)
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return nn.LayerNorm(out_ch, module.eps, module.elementwise_affine)
    if isinstance(module, nn.GroupNorm) and out_ch % module.num_groups == 0:
        return nn.GroupNorm(module.num_groups, out_ch, module.eps, module.affine)
    raise ModelSpecError(f"cannot resize a {type(module).__name__} to {out_ch} channels")


def widened_model(model: nn.Module, structures: StructureSet, factors: Mapping[str, float]) -> nn.Module:
    """A freshly initialised copy of `model` whose coupled groups named in `factors` are widened (any architecture)."""
    layer_index = structures.layer_index()
    delta = torch.zeros(structures.removal.shape[1], dtype=torch.float64)
    for key, f in factors.items():
        groups = (
            [g for g, l in enumerate(structures.layers) if l.stage == key]
            if key.startswith("stage")
            else [layer_index.get(key)]
        )
        if None in groups or not groups:
            raise ModelSpecError(f"'{key}' is neither a prunable layer nor a stage of this model")
        for g in groups:
            delta += structures.removal[structures.layer_of == g].sum(0) * (f - 1)
    wide = copy.deepcopy(model)
    for i, info in enumerate(structures.modules):
        d_in, d_out = int(round(delta[2 * i].item())), int(round(delta[2 * i + 1].item()))
        if d_in == 0 and d_out == 0:
            continue
        parent_name, _, child = info.name.rpartition(".")
        parent = wide.get_submodule(parent_name) if parent_name else wide
        setattr(
            parent,
            child,
            resized_module(getattr(parent, child), info.in_channels + d_in, info.out_channels + d_out),
        )
    for m in wide.modules():
        if hasattr(m, "reset_parameters") and m is not wide:
            m.reset_parameters()
    return wide


def is_zoo(model_spec: str) -> bool:
    return ZOO_PATTERN.match(model_spec.strip()) is not None


def build_widened(
    model_spec: str,
    num_classes: int,
    in_channels: int,
    structures: StructureSet,
    factors: Mapping[str, float],
    example_input: torch.Tensor,
) -> tuple[nn.Module, str | None]:
    """(fresh widened model, its zoo spec or None): zoo models by spec, others by dependency-group surgery."""
    base = build_model(model_spec, num_classes, in_channels)
    if not factors:
        return base, model_spec
    if is_zoo(model_spec):
        spec = widened_spec(model_spec, base, structures, factors)
        return build_model(spec, num_classes, in_channels), spec
    wide = widened_model(base, structures, factors)
    with torch.no_grad():
        wide.eval()(example_input)
    return wide.train(), None


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def every_layer(model_spec: str, structures: StructureSet, factor: float) -> dict[str, float]:
    """Factors that widen the whole network: every stage (ResNets, DenseNets) or every prunable layer (others)."""
    if is_zoo(model_spec) and not model_spec.startswith("vgg"):
        return {stage: factor for stage in dict.fromkeys(l.stage for l in structures.layers)}
    return {layer.name: factor for layer in structures.layers}


UNIFORM_FACTORS = (1.0, 4.0)  # the widths a widen-pruned net is searched between


def uniform_factor(
    model_spec: str,
    num_classes: int,
    in_channels: int,
    structures: StructureSet,
    target_params: int,
    example_input: torch.Tensor,
) -> tuple[float, int]:
    """The one width factor for the whole network (in UNIFORM_FACTORS) whose parameter count is closest to
    `target_params` (widen-pruning)."""
    low, high = UNIFORM_FACTORS

    def params(f: float) -> int:
        model, _ = build_widened(
            model_spec,
            num_classes,
            in_channels,
            structures,
            every_layer(model_spec, structures, f),
            example_input,
        )
        return params_of(model)

    while high - low > 1e-3:
        mid = (low + high) / 2
        if params(mid) < target_params:
            low = mid
        else:
            high = mid
    best = min((low, high), key=lambda f: abs(params(f) - target_params))
    return round(best, 4), params(best)
