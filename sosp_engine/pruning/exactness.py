"""Where removing a structure is the same network as zeroing its in-weights, and how far apart they are elsewhere.

The saliencies describe the zero-masked network. Removal equals zeroing when a zeroed channel stays zero until every
consumer reads it (conv -> affine norm -> ReLU-like, linear, residual add, concat, gates that multiply) and no norm
mixes it with the kept channels. It differs after a BatchNorm without affine parameters or an activation with
f(0) != 0 (the zeroed channel arrives as a constant), and under GroupNorm / LayerNorm (statistics change).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Iterable

import torch
from torch import nn

from .masks import pruned_copy, zeroed_copy
from .structures import StructureSet

RELATIVE_TOLERANCE = 1e-5  # a zeroed channel's leak, relative to the input it reaches
# the verdict "exact": the pruned and the zero-masked nets agree to this relative deviation, per precision measured in
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
RANDOM_MASKS = 1  # masks drawn besides the analysis's own: exact must hold for masks the order did not choose
# Samples the pruned-vs-zeroed comparison runs on. A wrong routing moves the output by the contribution of whole
# channels (relative deviations of 1e-3 and more, against a float64 tolerance of 1e-9), so one sample on which those
# channels are alive shows it; it hides only where every misrouted channel is zero at its consumer on every sample
# (dead after a ReLU), which for k >= 2 misrouted channels, each dead with odds about 1/2 on an unrelated sample, has
# odds below 2^-(4k) on 4 samples. More samples buy nothing but float64 convolution time.
EXACTNESS_SAMPLES = 4
VERDICT_CACHE_SIZE = 64
_verdicts: OrderedDict[tuple, dict] = OrderedDict()


def _channel_mixing_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.GroupNorm):
        return module.num_groups < module.num_channels
    return isinstance(module, nn.LayerNorm)


def _consumer_inputs(model: nn.Module, names: set[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input tensor of each named module on `x` (first call only)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:

        def hook(module, args, name=name):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach()

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def approximate_layers(model: nn.Module, structures: StructureSet, x: torch.Tensor) -> dict[str, str]:
    """Layers whose removal is not the zero-masked network, each with the reason (one forward pass on `x`)."""
    reasons: dict[str, str] = {}
    for layer in structures.layers:
        mixing = [p for p in layer.producers if _channel_mixing_norm(model.get_submodule(p))]
        if mixing:
            reasons[layer.name] = (
                f"{mixing[0]} normalises over several channels: removing some changes the others"
            )
    was_training = model.training
    model.eval()
    zeroed = zeroed_copy(model, structures, structures.keys).eval()
    names = {piece.module for piece in structures.consumed}
    try:
        plain, masked = _consumer_inputs(model, names, x), _consumer_inputs(zeroed, names, x)
    finally:
        model.train(was_training)
    for piece in structures.consumed:
        if piece.module not in masked:
            continue
        dim = -1 if isinstance(model.get_submodule(piece.module), nn.Linear) else 1
        inputs = masked[piece.module]
        values = inputs.index_select(dim % inputs.ndim, piece.channels.to(inputs.device))
        scale = plain[piece.module].abs().max().item() or 1.0
        leaking = values.abs().flatten(1).amax(1) if values.ndim > 1 else values.abs()
        if leaking.max().item() > RELATIVE_TOLERANCE * scale:
            layer = structures.layers[int(structures.layer_of[piece.structure[0]])].name
            reasons.setdefault(
                layer,
                f"a zeroed channel reaches {piece.module} as a nonzero value (an activation with "
                "f(0) != 0 or a BatchNorm without affine parameters on the way)",
            )
    return {layer.name: reasons[layer.name] for layer in structures.layers if layer.name in reasons}


def output_deviation(
    model: nn.Module,
    structures: StructureSet,
    mask: Iterable[str],
    example_input: torch.Tensor,
    x: torch.Tensor,
) -> float:
    """max |pruned(x) - zero-masked(x)| / max |zero-masked(x)|: 0 up to float error where removal equals zeroing."""
    mask = set(mask)
    was_training = model.training
    model.eval()
    try:
        smaller = pruned_copy(model, structures, mask, example_input).eval()
        zeroed = zeroed_copy(model, structures, mask).eval()
        with torch.no_grad():
            b = zeroed(x)
            try:
                a = smaller(x)
            except RuntimeError:  # e.g. a reshape that hard-codes a channel count no longer fits
                return float("inf")
    finally:
        model.train(was_training)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def random_masks(structures: StructureSet, count: int, seed: int = 0) -> list[set[str]]:
    """`count` random masks, each pruning about half of every layer and never emptying a producer."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(count):
        pruned = torch.rand(structures.num_structures, generator=generator) < 0.5
        for piece in structures.segments():  # keep one structure of every conv / linear producer
            if bool(pruned[piece.structure].all()):
                pruned[piece.structure[0]] = False
        masks.append({structures.keys[i] for i in pruned.nonzero().flatten().tolist()})
    return masks


def _in_float64(model: nn.Module, example_input: torch.Tensor, x: torch.Tensor):
    """Float64 copies of the model and inputs where the model runs in float64, else the originals."""
    import copy

    if not x.is_floating_point():
        return model, example_input, x
    try:
        wide = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            wide(example_input.double())
        return wide, example_input.double(), x.double()
    except (RuntimeError, TypeError, NotImplementedError):
        return model, example_input, x


def responsible_layers(
    model: nn.Module, structures: StructureSet, example_input: torch.Tensor, x: torch.Tensor, tolerance: float
) -> dict[str, str]:
    """Layers whose pruning alone (half of their structures) moves the output beyond `tolerance`, with it."""
    found = {}
    starts = structures.layer_starts()
    for g, layer in enumerate(structures.layers):
        half = list(range(starts[g], starts[g] + max(1, layer.size // 2)))
        mask = {structures.keys[i] for i in half}
        if structures.emptied_producers(structures.pruned_vector(mask)):
            continue
        deviation = output_deviation(model, structures, mask, example_input, x)
        if deviation == float("inf"):
            found[layer.name] = "the net pruned there alone does not run"
        elif deviation > tolerance:
            found[layer.name] = f"pruning it alone deviates from zeroing it by {deviation:.1e} of the output"
    return found


def unfaithful_permutations(
    model: nn.Module, structures: StructureSet, example_input: torch.Tensor
) -> dict[str, str]:
    """{layer: why it is not offered} for each layer whose channels pass an op of fixed sizes (a view into heads, a
    channel shuffle, a split, a computed weight) and whose pruning (its first structure, then every second one) does
    not run, or deviates from zeroing where no mixing norm explains it."""
    tolerance = TOLERANCE.get(example_input.dtype, TOLERANCE[torch.float32])
    known = approximate_layers(
        model, structures, example_input
    )  # a mixing norm: a deviation is expected there
    measured = [g for g, layer in enumerate(structures.layers) if layer.name in structures.measured]
    suspects = []
    for together in (  # the common case in one pass each: every such layer pruned at once fits
        [g for g in measured if structures.layers[g].name not in known],
        [g for g in measured if structures.layers[g].name in known],
    ):
        if together and _unfit(model, structures, example_input, together, tolerance, known):
            suspects += together
    refused = {}
    for g in suspects:
        why = _unfit(model, structures, example_input, [g], tolerance, known)
        if why:
            where = ", ".join(structures.measured[structures.layers[g].name][:3])
            refused[structures.layers[g].name] = (
                f"its channels pass ops whose sizes the graph fixes ({where}); the net pruned there {why}: "
                "the module's code reshapes or splits a smaller tensor another way, or no longer fits it"
            )
    return refused


def _masks_of(structures: StructureSet, layers: list[int]) -> list[set[str]]:
    """Two masks over the given layers: the first structure of each, then every second one."""
    starts = structures.layer_starts()
    layers = [g for g in layers if structures.layers[g].size > 1]  # a one-structure layer can never be pruned
    first = {structures.keys[starts[g]] for g in layers}
    alternate = {structures.keys[i] for g in layers for i in range(starts[g], starts[g + 1], 2)}
    return [first, alternate]


def _unfit(
    model: nn.Module,
    structures: StructureSet,
    example_input: torch.Tensor,
    layers: list[int],
    tolerance: float,
    known: dict[str, str],
) -> str:
    """How the net pruned in `layers` fails ("does not run", "deviates ..."), or '' where it fits; a deviation counts
    only where no layer of them is known to mix channels."""
    expected = any(structures.layers[g].name in known for g in layers)
    for mask in _masks_of(structures, layers):
        if structures.emptied_producers(structures.pruned_vector(mask)):
            continue
        deviation = output_deviation(model, structures, mask, example_input, example_input)
        if deviation == float("inf"):
            return "does not run"
        if deviation > tolerance and not expected:
            return f"deviates from the zero-masked one by {deviation:.1e}"
    return ""


def exactness_report(
    model: nn.Module,
    structures: StructureSet,
    mask: Iterable[str],
    example_input: torch.Tensor,
    x: torch.Tensor,
) -> dict:
    """Whether the pruned model equals the zero-masked one, as measured: on the first `EXACTNESS_SAMPLES` of `x`, in
    float64 where the model allows, for `mask` and a random mask. "exact" only when every measured deviation is within
    the precision's tolerance and no layer is known to differ; otherwise the layers responsible, with the reason or
    the deviation."""
    start = time.perf_counter()
    x = x[:EXACTNESS_SAMPLES]
    approximate = approximate_layers(model, structures, x)
    wide, example, inputs = _in_float64(model, example_input, x)
    tolerance = TOLERANCE.get(inputs.dtype, TOLERANCE[torch.float32])
    deviations = [
        output_deviation(wide, structures, m, example, inputs)
        for m in [set(mask)] + random_masks(structures, RANDOM_MASKS)
    ]
    if max(deviations) > tolerance and not approximate:
        approximate = responsible_layers(wide, structures, example, inputs, tolerance) or {
            "(the whole net)": f"measured {max(deviations):.1e}, no single layer alone exceeds the tolerance"
        }
    return {
        "exact": not approximate and max(deviations) <= tolerance,
        "approximate_layers": approximate,
        "deviation": deviations[0],
        "largest_deviation": max(deviations),
        "masks": len(deviations),
        "tolerance": tolerance,
        "precision": str(inputs.dtype).removeprefix("torch."),
        "samples": len(x),
        "measured_at": time.time(),
        "seconds": time.perf_counter() - start,
    }


def cached_exactness(
    model: nn.Module,
    structures: StructureSet,
    mask: Iterable[str],
    example_input: torch.Tensor,
    x: torch.Tensor,
    fingerprint: str,
) -> dict:
    """`exactness_report`, measured once per (structures, weights, precision) in this process: whether removal equals
    zeroing is a property of the net's wiring and weights, not of the analysis that asks, so a second analysis of
    the same net reuses the verdict (marked "reused", with when and how it was measured)."""
    key = (structures.signature, tuple(structures.keys), fingerprint, str(x.dtype), str(x.device))
    if key in _verdicts:
        _verdicts.move_to_end(key)
        return {**_verdicts[key], "reused": True}
    mask = set(mask)
    report = {
        **exactness_report(model, structures, mask, example_input, x),
        "ratio": len(mask) / max(len(structures.keys), 1),
    }
    _verdicts[key] = report
    while len(_verdicts) > VERDICT_CACHE_SIZE:
        _verdicts.popitem(last=False)
    return {**report, "reused": False}


def exactness_line(report: dict) -> str:
    """One line for the CLI and the UI: 'exact' or 'approximate in N layers: ...' with the measured deviation."""
    where = f" pruned at {report['ratio']:.0%} of the structures" if "ratio" in report else ""
    measured = f"on {report['samples']} samples in {report.get('precision', 'float32')}" + (
        f", {report['masks']} masks" if "masks" in report else ""
    )
    if report.get("reused"):
        measured += " (reused: this net and weights were measured earlier in this process)"
    if report["exact"]:
        tolerance = f" <= {report['tolerance']:.0e}" if "tolerance" in report else ""
        return (
            f"exact: the pruned model equals the zero-masked one (relative deviation "
            f"{report.get('largest_deviation', report['deviation']):.1e}{tolerance} measured {measured}{where})"
        )
    names = list(report["approximate_layers"])
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return (
        f"approximate in {len(names)} layers: {shown}; the pruned model deviates from the zero-masked one the "
        f"saliencies describe by {report['deviation']:.2%} of its output (largest "
        f"{report.get('largest_deviation', report['deviation']):.2%}) measured {measured}{where}"
    )
