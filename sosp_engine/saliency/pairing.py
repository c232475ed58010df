"""Producers read by nothing but their eval-mode BatchNorm: there the norm's output alone carries both layers' terms.

SOSP-H folds such a producer's channel scale into the norm's coefficients; SOSP-I reads both products from the norm's
output gradient and the producer's output. The pairing is found on one sample and confirmed on the model's output.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from ..devices import full_float32
from .common import AnalysisInputs, batch_norm_coefficients, channel_dim, equal_up_to_rounding, patched_forwards, \
    per_channel
from .homogeneity import capture_point


class _TensorUses(TorchFunctionMode):
    """Counts the torch calls that take each watched tensor, outside the modules that are allowed to read it."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}
        self.uses: dict[int, int] = {}
        self.inside = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside:
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and id(t) in self.watched:
                    self.uses[id(t)] = self.uses.get(id(t), 0) + 1
        return func(*args, **kwargs)


@full_float32()
def sole_norm_consumers(inputs: AnalysisInputs, names: list[str], affine: set[int]) -> dict[str, str]:
    """{norm: producer} for each eval-mode BatchNorm whose input is a producer's output that nothing else reads.

    There the producer's alpha can join the norm's scale (one full-size multiply and one saved tensor fewer).
    Found on one sample: a producer that runs once, a norm that runs once on that output, and no other torch call
    on it (a TorchScript function does not report its calls; a scripted reader would go unseen).
    """
    model = inputs.model
    uses = _TensorUses()
    calls: dict[str, int] = {}
    source: dict[int, str] = {}
    pairs: dict[str, str] = {}

    def produced(module, args, out, name):
        calls[name] = calls.get(name, 0) + 1
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and channel_dim(module, out) == 1 \
                and capture_point(module) is module:  # a norm-act's output is after its activation
            uses.watched[id(out)] = out
            source[id(out)] = name

    def entering(module, args, name):
        calls[name] = calls.get(name, 0) + 1
        uses.inside += 1  # this hook's own look at the input is not a use
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in source \
                and args[0].shape[1] == module.num_features:
            pairs[name] = source[id(args[0])]
        else:
            uses.inside -= 1

    def leaving(module, args, out, name):
        if name in pairs and uses.inside:
            uses.inside -= 1

    norms = {n: m for n, m in model.named_modules() if id(m) in affine}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: produced(m, a, o, n))
             for n in names if n not in norms]
    for n, m in norms.items():
        hooks.append(m.register_forward_pre_hook(lambda m, a, n=n: entering(m, a, n)))
        hooks.append(m.register_forward_hook(lambda m, a, o, n=n: leaving(m, a, o, n)))
    try:
        with torch.no_grad(), uses:
            plain = model(inputs.x[:1].to(inputs.device))
    finally:
        for h in hooks:
            h.remove()
    by_producer = list(pairs.values())
    fused = {norm: p for norm, p in pairs.items() if calls.get(norm) == 1 and calls.get(p) == 1
             and by_producer.count(p) == 1 and not any(uses.uses.get(i, 0) for i, src in source.items() if src == p)}
    return fused if fused and _pairing_holds(inputs, fused, plain) else {}


def _pairing_holds(inputs: AnalysisInputs, fused: dict[str, str], plain: torch.Tensor) -> bool:
    """The model's output is unchanged when each paired producer's output is scaled by random r > 0 and its norm
    divides by r again: nothing but the norm reads it (this also sees readers that report no torch calls)."""
    model = inputs.model
    generator = torch.Generator().manual_seed(1)
    factors = {p: torch.empty(model.get_submodule(norm).num_features, dtype=torch.float64).uniform_(
        0.5, 2.0, generator=generator) for norm, p in fused.items()}

    def undo(m, r):
        def forward(x: torch.Tensor) -> torch.Tensor:
            scale, shift = batch_norm_coefficients(m)
            return x * per_channel(scale / r.to(scale), x) + per_channel(shift, x)
        return forward

    hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, out, r=r: out * per_channel(r.to(out), out))
             for p, r in factors.items()]
    try:
        with torch.no_grad(), patched_forwards({model.get_submodule(n): undo(model.get_submodule(n), factors[p])
                                                for n, p in fused.items()}):
            scaled = model(inputs.x[:1].to(inputs.device))
    finally:
        for h in hooks:
            h.remove()
    return equal_up_to_rounding(scaled, plain, plain)
