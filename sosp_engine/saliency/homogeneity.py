"""Which producers satisfy Euler's identity theta_c . d out_c / d theta_c = out_c, checked on the model itself.

SOSP-I reads phi theta_s as gradient x output, and SOSP-H's fast path scales outputs in place of weights; both hold
exactly when a producer's output channel c is positively homogeneous of degree one in its own weight and bias rows.
Plain convs, linears and affine norms are; a norm with a smooth activation inside (timm's BatchNormAct2d with SiLU),
weight standardisation or a hook that squares the output are not. The check runs each producer once with its rows
scaled by random positive factors and compares the output with the scaled output.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..pruning.structures import channel_dim
from ..devices import full_float32
from ..pruning.structures import output_axis
from .common import AnalysisInputs, equal_up_to_rounding, per_channel

ROW_PARAMETERS = ("weight", "bias")


def producer_modules(inputs: AnalysisInputs) -> list[str]:
    """The producer modules holding rows of theta_s (a norm without affine parameters holds none), in a fixed order."""
    return list(dict.fromkeys(s.module for s in inputs.slices))


def capture_point(module: nn.Module) -> nn.Module:
    """Where a producer's per-channel output is read: the module itself, or for a norm with its activation inside
    (timm's norm-act layers compute norm -> drop -> act) the `drop` child, whose output is the norm's."""
    children = dict(module.named_children())
    if isinstance(children.get("drop"), nn.Module) and isinstance(children.get("act"), nn.Module):
        return children["drop"]
    return module


@full_float32()
def not_scaling(inputs: AnalysisInputs) -> list[str]:
    """The producers whose captured output does not scale channel by channel with their rows (empty when all do)."""
    names = producer_modules(inputs)
    model = inputs.model
    calls: dict[str, tuple] = {}

    def first_call(
        name: str, args: tuple, kwargs: dict
    ) -> None:  # returns None: the call's inputs stay its own
        calls.setdefault(name, (args, kwargs))

    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, kwargs, n=n: first_call(n, args, kwargs), with_kwargs=True
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(inputs.x[:1].to(inputs.device))
    finally:
        for h in hooks:
            h.remove()
    generator = torch.Generator().manual_seed(0)
    return [n for n in names if n in calls and not _scales(model.get_submodule(n), *calls[n], generator)]


def _scales(module: nn.Module, args: tuple, kwargs: dict, generator: torch.Generator) -> bool:
    """True when the output at the capture point, with the rows scaled by r > 0, is r times the output."""
    outputs: list[torch.Tensor] = []
    hook = capture_point(module).register_forward_hook(  # a copy: an in-place activation may follow
        lambda m, a, out: outputs.append(out.clone() if isinstance(out, torch.Tensor) else out)
    )
    try:
        with torch.no_grad():
            module(*args, **kwargs)
            name = next(k for k in ROW_PARAMETERS if getattr(module, k, None) is not None)
            rows = getattr(module, name).shape[output_axis(module, name)]
            r = torch.empty(rows, dtype=torch.float64).uniform_(0.5, 2.0, generator=generator)
            scaled = {
                k: p * per_channel(r.to(p), p, output_axis(module, k))
                for k in ROW_PARAMETERS
                if isinstance(p := getattr(module, k, None), nn.Parameter)
            }
            functional_call(module, scaled, args, kwargs)
    finally:
        hook.remove()
    plain, rescaled = outputs[0], outputs[-1]
    if not isinstance(plain, torch.Tensor) or len(outputs) != 2:
        return False
    dim = channel_dim(module, plain)
    if plain.shape[dim] != len(r):
        return False
    return equal_up_to_rounding(rescaled, plain * per_channel(r.to(plain), plain, dim), plain)
