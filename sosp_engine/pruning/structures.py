"""Prunable structures: every coupled channel group the engine's tracer finds (channel_trace.py) is a layer, each
class of channels that go together a structure."""

from __future__ import annotations

import fnmatch
import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn

from ..errors import MaskError
from .channel_trace import (
    CONV_TYPES,
    NORM_TYPES,
    PRODUCER_TYPES,
    TRANSPOSED_TYPES,
    is_depthwise,
    trace_channels,
)
from .coupled_groups import TracedGroup, coupled_groups, parameter_axes

PRESETS = {
    "cifar-resnet": ("*shortcut*",),
    "torchvision-resnet": ("*downsample*",),
}


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag afterwards (the tracer runs the model in eval mode)."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def architecture_signature(model: nn.Module) -> str:
    """A hash of parameter names and shapes: equal for two models of the same architecture, whatever their weights."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)};".encode())
    return digest.hexdigest()[:16]


def output_axis(module: nn.Module, parameter: str) -> int:
    """The axis of a producer's parameter that indexes its output channels: 1 for a transposed conv's weight
    (in, out, kernel...), else 0."""
    return 1 if isinstance(module, TRANSPOSED_TYPES) and parameter == "weight" else 0


def on_model_device(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` on the device of `model`'s first parameter or buffer (a model timed on a GPU is traced there)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return x if tensor is None else x.to(tensor.device)


class Call(NamedTuple):
    """One call of a module: its first input's and its output's shapes."""

    inputs: tuple
    output: tuple


@dataclass
class ModuleInfo:
    """What the counting needs of one parameterised module: its type, channel sizes and output positions."""

    name: str
    kind: str  # conv | depthwise | linear | norm | vector (a bare per-channel parameter, e.g. layer scale) | other
    in_channels: int
    out_channels: int
    groups: int
    kernel_elems: int
    positions: int  # output positions (spatial size, or tokens for linear)
    has_bias: bool
    fixed_params: int  # parameters of an 'other' module, or extra ones the formula does not cover
    layer: int = -1  # index of the layer this module produces, -1 if none

    def params(self, in_kept: float, out_kept: float) -> float:
        """Parameters of this module with the given kept input / output channels."""
        if self.kind == "conv":
            return (
                out_kept * (in_kept / self.groups) * self.kernel_elems
                + (out_kept if self.has_bias else 0)
                + self.fixed_params
            )
        if self.kind == "depthwise":
            return out_kept * self.kernel_elems + (out_kept if self.has_bias else 0) + self.fixed_params
        if self.kind == "linear":
            return out_kept * in_kept + (out_kept if self.has_bias else 0) + self.fixed_params
        if self.kind == "norm":
            return out_kept * (2 if self.has_bias else 1) + self.fixed_params
        if self.kind == "vector":
            return out_kept * self.kernel_elems
        return self.fixed_params

    def macs(self, in_kept: float, out_kept: float) -> float:
        """Multiply-accumulates of one forward pass of one sample (convs and linears only)."""
        if self.kind == "conv":
            return out_kept * (in_kept / self.groups) * self.kernel_elems * self.positions
        if self.kind == "depthwise":
            return out_kept * self.kernel_elems * self.positions
        if self.kind == "linear":
            return out_kept * in_kept * self.positions
        return 0.0


def channel_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The axis of a module's output that indexes its channels (last for linear layers and channels-last norms)."""
    if isinstance(module, nn.Linear) or output.ndim <= 2:
        return output.ndim - 1
    if type(module) is nn.LayerNorm:
        return output.ndim - 1
    if isinstance(module, nn.LayerNorm):  # subclasses such as timm's LayerNorm2d normalise NCHW over dim 1
        return 1 if output.shape[1] == module.normalized_shape[0] else output.ndim - 1
    return 1


@dataclass
class Layer:
    """One coupled channel group: the unit of the per-layer tables; `size` structures of `channels // size`
    channels each."""

    name: str
    size: int
    kernel: float
    depth: int
    stage: str
    block: str
    producers: list[str]
    consumers: list[str]
    channels: int = 0
    structure_channels: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.channels:
            self.channels = self.size
        if not self.structure_channels:
            self.structure_channels = [[c] for c in range(self.size)]

    @property
    def structure_size(self) -> int:
        """Channels removed together with one structure (1 except around grouped convolutions and GroupNorm)."""
        return self.channels // max(self.size, 1)

    def describe(self) -> dict:
        """What a stored analysis keeps of the layer (name, size, depth, stage, block, kernel)."""
        return {
            "name": self.name,
            "size": self.size,
            "depth": self.depth,
            "stage": self.stage,
            "block": self.block,
            "kernel": self.kernel,
        }

    def root_channels(self, structures: Sequence[int]) -> list[int]:
        """The root module's channel indices of the given local structure indices."""
        return sorted(c for s in structures for c in self.structure_channels[s])


@dataclass
class ProducerSlice:
    """Output-channel slices of one producer module: `channels[i]` of it belongs to structure `structure[i]`."""

    module: str
    channels: torch.Tensor
    structure: torch.Tensor


@dataclass
class StructureSet:
    """All prunable structures of a model with the data to count, zero and physically prune them."""

    signature: str
    layers: list[Layer]
    keys: list[str]
    layer_of: torch.Tensor
    producers: list[ProducerSlice]
    modules: list[ModuleInfo]
    # removal[s, j]: channels of module dimension j (2*module index + 0 for in, + 1 for out) removed with structure s
    removal: torch.Tensor
    excluded: list[str] = field(default_factory=list)
    unprunable: dict[str, str] = field(default_factory=dict)  # root module -> why its group cannot be pruned
    consumed: list[ProducerSlice] = field(
        default_factory=list
    )  # consumers' input-channel slices of each structure
    # layer -> the ops that fix its sizes in the graph (a view into heads, a split, a computed weight): its pruning is
    # measured before it is offered
    measured: dict[str, list[str]] = field(default_factory=dict)
    parameters: list[ProducerSlice] = field(default_factory=list)  # bare parameters' slices of each structure
    parameter_axes: dict[str, int] = field(
        default_factory=dict
    )  # bare parameter -> the axis its channels run along
    heads: dict[str, list[int]] = field(
        default_factory=dict
    )  # attention module -> the structure of each head
    held_back: dict[str, str] = field(
        default_factory=dict
    )  # producer -> the excluded module its channels go with
    shared: list[str] = field(
        default_factory=list
    )  # offered producers whose output is one for the whole batch

    def channel_account(self) -> list[dict]:
        """Every output channel of every conv and linear: offered (in a structure), unprunable (with why), or
        excluded (with the excluded module it goes with); a producer the forward pass never runs keeps its channels.
        The three counts of each row add up to its width."""
        offered: dict[str, int] = {}
        for piece in self.producers:
            offered[piece.module] = offered.get(piece.module, 0) + len(piece.channels)
        rows = []
        for m in self.modules:
            if m.kind not in ("conv", "depthwise", "linear"):
                continue
            row = {"module": m.name, "width": m.out_channels, "offered": 0, "unprunable": 0, "excluded": 0}
            if m.name in offered:
                row["offered"] = offered[m.name]
            elif m.name in self.unprunable:
                row |= {"unprunable": m.out_channels, "why": self.unprunable[m.name]}
            elif m.name in self.held_back:
                row |= {"excluded": m.out_channels, "why": f"excluded with {self.held_back[m.name]}"}
            else:
                row |= {"unprunable": m.out_channels, "why": "not run in the forward pass: kept as it is"}
            rows.append(row)
        return rows

    @property
    def num_structures(self) -> int:
        return len(self.keys)

    def key_index(self) -> dict[str, int]:
        """Structure key -> position."""
        return {k: i for i, k in enumerate(self.keys)}

    def layer_sizes(self) -> torch.Tensor:
        return torch.tensor([layer.size for layer in self.layers])

    def kernel_sizes(self) -> torch.Tensor:
        """Kernel side length of each structure's layer: the in-weight-weighted mean over its conv / linear
        producers."""
        return torch.tensor([self.layers[g].kernel for g in self.layer_of.tolist()], dtype=torch.float64)

    def module_costs(self, pruned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-module parameters and MACs after removing the structures flagged in `pruned` (bool, S)."""
        removed = torch.zeros(self.removal.shape[1], dtype=torch.float64)
        if pruned is not None and bool(pruned.any()):
            removed = pruned.to(torch.float64) @ self.removal
        params, macs = [], []
        for i, m in enumerate(self.modules):
            in_kept = m.in_channels - removed[2 * i].item()
            out_kept = m.out_channels - removed[2 * i + 1].item()
            if m.kind == "depthwise":
                in_kept = out_kept
            params.append(m.params(in_kept, out_kept))
            macs.append(m.macs(in_kept, out_kept))
        return torch.tensor(params, dtype=torch.float64), torch.tensor(macs, dtype=torch.float64)

    def counts(self, pruned: torch.Tensor | None = None) -> tuple[int, int]:
        """Exact total parameters and MACs of the model after removing the flagged structures."""
        params, macs = self.module_costs(pruned)
        return int(round(params.sum().item())), int(round(macs.sum().item()))

    def structure_macs(self) -> torch.Tensor:
        """MACs removed by pruning each structure alone (the costs are linear in each channel count)."""
        _, macs = self.module_costs()
        marginal = torch.zeros(self.removal.shape[1], dtype=torch.float64)
        for i, m in enumerate(self.modules):
            if m.kind == "depthwise":
                marginal[2 * i + 1] = macs[i] / max(m.out_channels, 1)
            else:
                marginal[2 * i] = macs[i] / max(m.in_channels, 1)
                marginal[2 * i + 1] = macs[i] / max(m.out_channels, 1)
        return self.removal @ marginal

    def segments(self) -> list[ProducerSlice]:
        """Slices of conv / linear producers: each must keep at least one channel or the module would be empty."""
        kinds = {m.name: m.kind for m in self.modules}
        return [p for p in self.producers if kinds.get(p.module) in ("conv", "depthwise", "linear")]

    def emptied_producers(self, pruned: torch.Tensor) -> list[str]:
        """Conv / linear modules that would lose every output channel under `pruned`."""
        return [p.module for p in self.segments() if bool(pruned[p.structure].all())]

    def layer_starts(self) -> list[int]:
        """Index of each layer's first structure (structures are numbered layer by layer)."""
        return torch.cumsum(torch.tensor([0] + [l.size for l in self.layers]), 0).tolist()

    def aliases(self) -> dict[str, str]:
        """Keys an earlier version gave these structures -> their key now. Earlier versions (torch-pruning's graph)
        named a layer after another of its producers and numbered its structures by that producer's channels; each
        producer's structures, ranked by their first channel of it, give those names."""
        kinds = {m.name: m.kind for m in self.modules}
        found: dict[str, str] = {}
        for piece in self.producers:
            if kinds.get(piece.module) not in ("conv", "depthwise", "linear"):
                continue
            first: dict[int, int] = {}
            for c, s in zip(piece.channels.tolist(), piece.structure.tolist()):
                first[s] = min(first.get(s, c), c)
            for rank, s in enumerate(sorted(first, key=first.__getitem__)):
                found.setdefault(f"{piece.module}:{rank}", self.keys[s])
        return found

    def layer_index(self) -> dict[str, int]:
        """Layer name -> its position; any producer of a layer names it too (an earlier version named some layers
        after another of their producers)."""
        index = {name: g for g, layer in enumerate(self.layers) for name in layer.producers}
        return index | {layer.name: g for g, layer in enumerate(self.layers)}

    def current_keys(self, keys: Sequence[str]) -> list[str | None]:
        """Each key as these structures name it now (an earlier version's name translated), None where unknown."""
        index = self.key_index()
        if all(k in index for k in keys):
            return list(keys)
        aliases = self.aliases()
        return [k if k in index else aliases.get(k) for k in keys]

    def pruned_vector(self, mask: Sequence[str] | set[str]) -> torch.Tensor:
        """Bool vector over structures from a set of structure keys (an earlier version's names read too); unknown
        keys are a MaskError."""
        index = self.key_index()
        current = self.current_keys(list(mask))
        unknown = [k for k, now in zip(mask, current) if now is None]
        if unknown:
            raise MaskError(
                f"{len(unknown)} mask keys are not structures of this model (e.g. {unknown[:3]}); "
                "the mask was made for another architecture or exclusion setting"
            )
        mask = current
        vec = torch.zeros(self.num_structures, dtype=torch.bool)
        if mask:
            vec[[index[k] for k in mask]] = True
        return vec


def _counted_module(m: nn.Module) -> bool:
    """Convs, linears and norms (also wrappers such as timm's BatchNormAct2d): counted as modules; every other
    parameter is counted (and cut) on its own (layer scales, GRN, embeddings)."""
    return isinstance(m, PRODUCER_TYPES + NORM_TYPES)


def _bare_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters held by a module that is not counted as a whole (layer scales, class tokens, ...)."""
    return [
        (f"{n}.{pn}" if n else pn, p)
        for n, m in model.named_modules()
        if not _counted_module(m)
        for pn, p in m.named_parameters(recurse=False)
    ]


def _shape(value: object) -> tuple:
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def forward_records(model: nn.Module, example_input: torch.Tensor) -> tuple[list[str], dict[str, list[Call]]]:
    """Forward order of parameterised leaf modules (by first call) and every call's input and output shapes: a
    module applied twice (a reused block, weight sharing) costs MACs twice."""
    order: list[str] = []
    shapes: dict[str, list[Call]] = {}
    hooks = []
    for name, m in model.named_modules():
        if _counted_module(m):

            def hook(mod, inp, out, name=name):
                if name not in shapes:
                    order.append(name)
                shapes.setdefault(name, []).append(Call(_shape(inp), _shape(out)))

            hooks.append(m.register_forward_hook(hook))
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return order, shapes


def _weight_and_bias(m: nn.Module) -> int:
    return sum(p.numel() for p in (m.weight, getattr(m, "bias", None)) if isinstance(p, torch.Tensor))


def _positions(shape: tuple, first: int, last: int | None = None) -> int:
    """The product of shape[first:last] (1 for none): spatial positions, or the tokens a linear layer maps."""
    return math.prod(shape[first:last]) if len(shape) > first else 1


def module_info(name: str, m: nn.Module, calls: Sequence[Call]) -> ModuleInfo:
    """The counting data of one module; `positions` sums over every call (a transposed conv's MACs follow its
    input positions, every other conv's and linear's its output positions)."""
    own = sum(p.numel() for p in m.parameters(recurse=False))
    if isinstance(m, CONV_TYPES):
        kernel = int(torch.tensor(m.kernel_size).prod())
        transposed = isinstance(m, TRANSPOSED_TYPES)
        positions = sum(_positions(c.inputs if transposed else c.output, 2) for c in calls)
        kind = "depthwise" if is_depthwise(m) else "conv"
        return ModuleInfo(
            name,
            kind,
            m.in_channels,
            m.out_channels,
            m.groups,
            kernel,
            positions,
            m.bias is not None,
            own - _weight_and_bias(m),
        )
    if isinstance(m, nn.Linear):
        positions = sum(_positions(c.output, 1, -1) if len(c.output) > 2 else 1 for c in calls)
        return ModuleInfo(
            name,
            "linear",
            m.in_features,
            m.out_features,
            1,
            1,
            positions,
            m.bias is not None,
            own - _weight_and_bias(m),
        )
    if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None:
        channels = m.weight.shape[0]
        return ModuleInfo(
            name,
            "norm",
            channels,
            channels,
            1,
            1,
            1,
            getattr(m, "bias", None) is not None,
            own - m.weight.numel() - (m.bias.numel() if m.bias is not None else 0),
        )
    return ModuleInfo(name, "other", 0, 0, 1, 1, 1, False, own)


def _stage_labels(layers_out: list[tuple]) -> list[str]:
    resolutions: list[tuple] = []
    for shape in layers_out:
        res = tuple(shape[2:]) if len(shape) > 2 else ()
        if res not in resolutions:
            resolutions.append(res)
    labels = []
    for shape in layers_out:
        res = tuple(shape[2:]) if len(shape) > 2 else ()
        size = "x".join(str(v) for v in res) if res else "flat"
        labels.append(f"stage {resolutions.index(res) + 1} ({size})")
    return labels


def _mean_kernel(producers: list[nn.Module]) -> float:
    """Kernel side length of a layer: its conv / linear producers' sides weighted by their in-weights per channel."""
    weight, total = 0.0, 0.0
    for m in producers:
        if isinstance(m, CONV_TYPES):
            elems = int(torch.tensor(m.kernel_size).prod())
            per_channel = m.in_channels // m.groups * elems
            side = elems ** (1.0 / len(m.kernel_size))
        elif isinstance(m, nn.Linear):
            per_channel, side = m.in_features, 1.0
        else:
            continue
        weight += per_channel * side
        total += per_channel
    return weight / total if total else 1.0


@dataclass
class ModuleTable:
    """Every module (and bare parameter) counted, in forward order, with where to find each by name or parameter."""

    infos: list[ModuleInfo]
    position: dict[str, int]  # module or bare parameter name -> index in `infos`


def _module_table(model: nn.Module, order: list[str], shapes: dict, axes: dict[str, int]) -> ModuleTable:
    """The counted modules: those run in forward order, then those not run at inference (parameters, no MACs), then
    bare parameters as 'vector' modules (channels along the axis the trace found, else the last)."""
    module_names = list(order)
    module_names += [n for n, m in model.named_modules() if n not in shapes and _counted_module(m)]
    infos = [module_info(n, model.get_submodule(n), shapes.get(n, [])) for n in module_names]
    for info in infos:
        if info.name not in shapes:  # not run at inference (e.g. auxiliary heads): parameters, but no MACs
            info.positions = 0
    for pname, p in _bare_parameters(model):
        channels = p.shape[axes.get(pname, -1)] if p.ndim else 1
        infos.append(
            ModuleInfo(pname, "vector", channels, channels, 1, p.numel() // max(channels, 1), 1, False, 0)
        )
        module_names.append(pname)
    return ModuleTable(infos, {n: i for i, n in enumerate(module_names)})


def _layer_of_group(
    model: nn.Module, traced: TracedGroup, depth: int, stage: str, offset: int, table: ModuleTable
) -> tuple[Layer, list[ProducerSlice], list[ProducerSlice], list[ProducerSlice], torch.Tensor]:
    """The traced group as a layer of the structure set, with its structures numbered from `offset`: the layer, its
    producers', consumers' and bare parameters' channel slices, and its rows of the removal matrix. Modules are
    assigned to the layer they are the root of, else to their first."""
    layer = Layer(
        traced.root,
        len(traced.members),
        _mean_kernel([model.get_submodule(n) for n in traced.producers]),
        depth,
        stage,
        traced.root.rpartition(".")[0] or traced.root,
        list(traced.producers),
        sorted(set(traced.consumers)),
        traced.channels,
        traced.members,
    )
    slices = []
    for name, (idxs, structures) in traced.producers.items():
        slices.append(ProducerSlice(name, torch.tensor(idxs), torch.tensor(structures) + offset))
        info = table.infos[table.position[name]]
        if info.layer < 0 or name == traced.root:
            info.layer = depth
    consumed, parameters = [], []
    removal = torch.zeros(len(traced.members), 2 * len(table.infos), dtype=torch.float64)
    for name, dim, idxs, structures in traced.effects:
        piece = ProducerSlice(name, torch.tensor(idxs, dtype=torch.long), torch.tensor(structures) + offset)
        if dim == 0:
            consumed.append(piece)
        elif table.infos[table.position[name]].kind == "vector":
            parameters.append(piece)
        removal[:, 2 * table.position[name] + dim].index_add_(
            0, torch.tensor(structures, dtype=torch.long), torch.ones(len(structures), dtype=torch.float64)
        )
    return layer, slices, consumed, parameters, removal


def traced_structures(
    model: nn.Module,
    example_input: torch.Tensor,
    exclude: Sequence[str],
    preset: str | None,
    refused: dict[str, str] | None = None,
) -> StructureSet:
    """All prunable structures of `model` as the engine's tracer finds them; the final classifier, layers matching
    `exclude` and the `refused` layers ({root: why}) are left out. `offered.find_structures` is what callers use: it
    also drops layers whose pruning, measured, does not run or does not equal zeroing."""
    refused = refused or {}
    if preset is not None and preset not in PRESETS:
        raise MaskError(f"unknown exclusion preset '{preset}'; known: {sorted(PRESETS)}")
    patterns = list(exclude) + list(PRESETS.get(preset, ()))
    example_input = on_model_device(model, example_input)
    order, shapes = forward_records(model, example_input)
    producer_order = [n for n in order if isinstance(model.get_submodule(n), PRODUCER_TYPES)]
    if not producer_order:
        raise MaskError("the model has no convolution or linear layer to prune")
    classifier = producer_order[-1]
    ignored = {
        n
        for n, _ in model.named_modules()
        if n == classifier or any(fnmatch.fnmatchcase(n, p) for p in patterns)
    }
    with preserved_modes(model), torch.no_grad():
        model.eval()
        trace = trace_channels(model, example_input, {n for n, _ in _bare_parameters(model)})
    axes = parameter_axes(trace)
    table = _module_table(model, order, shapes, axes)
    position = {n: i for i, n in enumerate(order)}
    traced_groups, unprunable, held_back = coupled_groups(trace, position, ignored, axes)
    for group in [g for g in traced_groups if g.root in refused]:
        unprunable[group.root] = refused[group.root]
        traced_groups.remove(group)
    if not traced_groups:
        why = "; ".join(f"{name}: {reason}" for name, reason in unprunable.items())
        raise MaskError(
            "no prunable channel group found: "
            + (why if why else "every group contains the classifier or an excluded layer")
        )
    stages = _stage_labels([shapes[t.root][0].output if t.root in shapes else () for t in traced_groups])
    layers, slices, consumed, parameters, removal, heads, offset = [], [], [], [], [], {}, 0
    for depth, traced in enumerate(traced_groups):
        layer, produced, taken, held, rows = _layer_of_group(
            model, traced, depth, stages[depth], offset, table
        )
        layers.append(layer)
        slices += produced
        consumed += taken
        parameters += held
        removal.append(rows)
        heads |= {module: [s + offset for s in structures] for module, structures in traced.heads.items()}
        offset += layer.size
    return StructureSet(
        signature=architecture_signature(model),
        layers=layers,
        keys=[f"{layer.name}:{s}" for layer in layers for s in range(layer.size)],
        layer_of=torch.tensor([layer.depth for layer in layers for _ in range(layer.size)]),
        producers=slices,
        modules=table.infos,
        removal=torch.cat(removal),
        excluded=sorted(ignored),
        unprunable=unprunable,
        consumed=consumed,
        measured={t.root: t.measured for t in traced_groups if t.measured},
        parameters=parameters,
        parameter_axes={p.module: axes[p.module] for p in parameters},
        heads=heads,
        held_back=held_back,
        shared=[n for n in trace.shared if any(n in layer.producers for layer in layers)],
    )
