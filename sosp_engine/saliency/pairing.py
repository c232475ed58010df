"""Producers read by nothing but eval-mode BatchNorms: there the norms' outputs carry the producers' terms again.

SOSP-H folds a producer's channel scale into the coefficients of its sole norm; SOSP-I reads both products from the
norm's output gradient and the producer's output. Where a producer's channels reach several norms (a DenseNet's
concatenations), SOSP-I takes the norms' scale terms from the producer's own term. Each pairing is found on one sample
and confirmed on the model's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from ..pruning.structures import channel_dim
from ..devices import full_float32
from .common import (
    AnalysisInputs,
    batch_norm_coefficients,
    equal_up_to_rounding,
    patched_forwards,
    per_channel,
)
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
        if (
            isinstance(out, torch.Tensor)
            and out.dim() >= 2
            and channel_dim(module, out) == 1
            and capture_point(module) is module
        ):  # a norm-act's output is after its activation
            uses.watched[id(out)] = out
            source[id(out)] = name

    def entering(module, args, name):
        calls[name] = calls.get(name, 0) + 1
        uses.inside += 1  # this hook's own look at the input is not a use
        if (
            args
            and isinstance(args[0], torch.Tensor)
            and id(args[0]) in source
            and args[0].shape[1] == module.num_features
        ):
            pairs[name] = source[id(args[0])]
        else:
            uses.inside -= 1

    def leaving(module, args, out, name):
        if name in pairs and uses.inside:
            uses.inside -= 1

    norms = {n: m for n, m in model.named_modules() if id(m) in affine}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: produced(m, a, o, n))
        for n in names
        if n not in norms
    ]
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
    fused = {
        norm: p
        for norm, p in pairs.items()
        if calls.get(norm) == 1
        and calls.get(p) == 1
        and by_producer.count(p) == 1
        and not any(uses.uses.get(i, 0) for i, src in source.items() if src == p)
    }
    return fused if fused and _pairing_holds(inputs, fused, plain) else {}


def _pairing_holds(inputs: AnalysisInputs, fused: dict[str, str], plain: torch.Tensor) -> bool:
    """The model's output is unchanged when each paired producer's output is scaled by random r > 0 and its norm
    divides by r again: nothing but the norm reads it (this also sees readers that report no torch calls)."""
    generator = torch.Generator().manual_seed(1)
    factors, scales = {}, {}
    for norm, producer in fused.items():
        r = torch.empty(inputs.model.get_submodule(norm).num_features, dtype=torch.float64).uniform_(
            0.5, 2.0, generator=generator
        )
        factors[producer], scales[norm] = (torch.arange(len(r)), r), r
    return _scaling_cancels(inputs, factors, scales, plain)


@dataclass
class NormReaders:
    """Structures whose producers' outputs are read by nothing but the eval-mode BatchNorms in the same structure.

    There the norms' scale terms sum to the producers' terms (scaling the producers' channels by r and dividing the
    norms' scales by r leaves the model unchanged), so a structure's phi theta_s is twice its producers' terms plus
    each norm's shift * sum of its output gradient: no product with a norm's output is needed.
    """

    norms: set[str] = field(default_factory=set)  # norms whose every structure channel is such a structure's
    doubled: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # producer -> its channels there (on its device)


@full_float32()
def norm_read_structures(
    inputs: AnalysisInputs, names: list[str], affine: set[int], excluded: set[str]
) -> NormReaders:
    """The structures whose non-norm members' outputs only their own BatchNorm members read, confirmed on one sample
    (all or none: a confirmation that fails leaves every product to be read as before)."""
    model = inputs.model
    norms = {
        n
        for n in names
        if n not in excluded
        and id(model.get_submodule(n)) in affine
        and capture_point(model.get_submodule(n)) is model.get_submodule(n)
    }
    members: dict[int, set[str]] = {}
    structures_of: dict[str, set[int]] = {}
    for piece in inputs.structures.producers:
        for s in piece.structure.tolist():
            members.setdefault(s, set()).add(piece.module)
            structures_of.setdefault(piece.module, set()).add(s)
    candidates = {s for s, ms in members.items() if ms & norms and ms - norms and not ms & excluded}
    while (
        True
    ):  # a norm with a channel outside the candidates keeps its products: its structures are no candidates
        kept = {n for n in norms if structures_of[n] <= candidates}
        narrowed = {s for s in candidates if members[s] & norms <= kept}
        if narrowed == candidates:
            break
        candidates = narrowed
    if not candidates:
        return NormReaders()
    ratio = torch.empty(inputs.structures.num_structures, dtype=torch.float64).uniform_(
        0.5, 2.0, generator=torch.Generator().manual_seed(2)
    )
    scales = {n: torch.ones(model.get_submodule(n).num_features, dtype=torch.float64) for n in kept}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for piece in inputs.structures.producers:
        if piece.module in kept:
            scales[piece.module][piece.channels] = ratio[piece.structure]
            continue
        chosen = torch.tensor([s in candidates for s in piece.structure.tolist()], dtype=torch.bool)
        if chosen.any():
            channels, r = factors.get(piece.module, (piece.channels[:0], ratio[:0]))
            factors[piece.module] = (
                torch.cat([channels, piece.channels[chosen]]),
                torch.cat([r, ratio[piece.structure[chosen]]]),
            )
    if not _scaling_cancels(inputs, factors, scales):
        return NormReaders()
    return NormReaders(kept, {n: channels.to(inputs.device) for n, (channels, _) in factors.items()})


def _scale_divided_by(norm: torch.nn.Module, r: torch.Tensor):
    """An eval-mode BatchNorm's forward with its per-channel scale divided by `r` and its shift kept."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        scale, shift = batch_norm_coefficients(norm)
        return x * per_channel(scale / r.to(scale), x) + per_channel(shift, x)

    return forward


def _scaling_cancels(
    inputs: AnalysisInputs,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scales: dict[str, torch.Tensor],
    plain: torch.Tensor | None = None,
) -> bool:
    """The model's output (`plain`, if already computed) is unchanged on one sample when each producer's output
    channels are multiplied by `factors` ({module: (channels, r)}) and each norm's scale divided by `scales`: the
    norms are the only readers of those channels."""
    model = inputs.model
    x = inputs.x[:1].to(inputs.device)

    def scaled_output(module, out, channels, r):
        dim = channel_dim(module, out)
        factor = torch.ones(out.shape[dim], dtype=out.dtype, device=out.device)
        factor[channels.to(out.device)] = r.to(out)
        return out * per_channel(factor, out, dim)

    if plain is None:
        with torch.no_grad():
            plain = model(x)
    hooks = [
        capture_point(model.get_submodule(n)).register_forward_hook(
            lambda m, a, out, n=n, f=f: scaled_output(model.get_submodule(n), out, *f)
        )
        for n, f in factors.items()
    ]
    divided = {
        model.get_submodule(n): _scale_divided_by(model.get_submodule(n), r) for n, r in scales.items()
    }
    try:
        with torch.no_grad(), patched_forwards(divided):
            scaled = model(x)
    finally:
        for h in hooks:
            h.remove()
    return equal_up_to_rounding(scaled, plain, plain)
