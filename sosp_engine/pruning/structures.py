"""Prunable structures: every coupled channel group (torch-pruning's DependencyGraph) is a layer, each channel
a structure."""

from __future__ import annotations

import fnmatch
import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .channel_probe import measured_sources
from .coupling_graph import CouplingGraph
from ..errors import MaskError

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PRODUCER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + TRANSPOSED_TYPES
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + TRANSPOSED_TYPES
GROUPED_TRANSPOSED_REASON = (
    "a grouped transposed convolution's output channels: each group holds them in its own block of weight "
    "columns, which the engine does not split into structures (its input channels are pruned with the layer "
    "that feeds it)"
)
PRESETS = {
    "cifar-resnet": ("*shortcut*",),
    "torchvision-resnet": ("*downsample*",),
}


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag afterwards (torch-pruning's tracing leaves the model in eval mode)."""
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


def _input_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _channel_groups(module: nn.Module, is_out: bool) -> tuple[int, int]:
    """(channels, groups) of the dimension a coupled group touches, where equal channels per group must be kept."""
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_groups
    if isinstance(module, CONV_TYPES) and module.groups > 1 and not _is_depthwise(module):
        return (module.out_channels if is_out else module.in_channels), module.groups
    return 0, 1


def _partition(
    size: int,
    grouped: list[tuple[str, int, int, list[int], list[int]]],
    coupled: Sequence[Sequence[int]] = (),
) -> tuple[list[list[int]], str]:
    """Structures of one coupled group: root channels that must go together so every grouped module keeps equal groups.

    `grouped` holds (module, channels, groups, module idxs, root idxs) of each grouped conv / GroupNorm dimension in the
    group. A structure takes the channel at one local position of every group (torch-pruning's own rule for grouped
    layers), and every set of root channels in `coupled` (root channels that reach one channel of some module).
    Returns the structures and '' or, when no such partition exists, ([], the reason).
    """
    parent = list(range(size))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for roots in coupled:
        for root in roots[1:]:
            parent[find(root)] = find(roots[0])

    for name, channels, groups, idxs, root_idxs in grouped:
        if sorted(idxs) != list(range(channels)):
            return [], f"feeds only part of the grouped layer {name} (groups={groups})"
        per_group = channels // groups
        first: dict[int, int] = {}
        for idx, root in zip(idxs, root_idxs):
            local = idx % per_group
            if local in first:
                parent[find(root)] = find(first[local])
            else:
                first[local] = root
    members: dict[int, list[int]] = {}
    for c in range(size):
        members.setdefault(find(c), []).append(c)
    structures = sorted(members.values())
    for name, channels, groups, idxs, root_idxs in grouped:
        per_group = channels // groups
        position = dict(zip(root_idxs, idxs))
        for channel_set in structures:
            locals_by_group: dict[int, set[int]] = {g: set() for g in range(groups)}
            for c in channel_set:
                locals_by_group[position[c] // per_group].add(position[c] % per_group)
            if len({frozenset(v) for v in locals_by_group.values()}) != 1:
                return [], f"its channels sit at different local positions of the groups of {name}"
    return structures, ""


# grad_fn names of ops that may reorder indices within the channel axis (a permute or transpose moves whole axes; a
# shuffle's reshapes are caught as reshapes)
REORDERING_OPS = ("Flip", "Index", "Gather", "Roll", "Take")
PROBE_MACS = 2e10  # the most multiply-accumulates one channel-order probe may cost (a few seconds on a CPU)
CHANNEL_SPLITTING_OPS = (tp.ops._SplitOp, tp.ops._SliceOp, tp.ops._UnbindOp)


def _unsupported(group, graph: tp.DependencyGraph, names: dict[nn.Module, str]) -> str:
    """Why torch-pruning cannot remove this group's channels consistently, or '' when it can."""
    folded = any(getattr(item, "coupled_roots", None) for item in group)
    for item in group:
        module = item.dep.target.module
        if isinstance(module, CHANNEL_SPLITTING_OPS):
            return (
                "its channels pass through a split / slice of the channel axis, which torch-pruning does not "
                "prune consistently"
            )
        if folded and isinstance(module, tp.ops._ReshapeOp):
            # torch-pruning guesses which channels a reshape folds together (SKNet's (B, 2C) -> (B, 2, C) pairs c with
            # c + C, it pairs 2c with 2c + 1), so the pruned net would not be the zero-masked one
            return (
                "a reshape folds several of its channels into one (as in SKNet's per-path attention), and "
                "torch-pruning cannot tell which"
            )
        if isinstance(module, PRODUCER_TYPES) and graph.is_out_channel_pruning_fn(item.dep.handler):
            extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
            if extra:
                return (
                    f"{names.get(module, '?')} has parameters besides weight and bias ({', '.join(extra)}) "
                    "that torch-pruning does not prune"
                )
    return ""


def _may_reorder(node) -> bool:
    """Whether an op of a traced group may reorder channels: a reshape of a tensor with positions (a flatten of
    pooled (N, C, 1, 1) keeps the order), or an op that indexes, flips or rolls."""
    grad_fn = getattr(node, "grad_fn", None)
    if isinstance(node.module, tp.ops._ReshapeOp):
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        return sizes is None or math.prod(int(v) for v in sizes[2:]) > 1
    return type(grad_fn).__name__.startswith(REORDERING_OPS)


def _probe_batch(group) -> int:
    return 4 * max(1, (len(group[0].idxs) - 1).bit_length()) + 1


def _permuted_channels(
    model: nn.Module,
    graph: tp.DependencyGraph,
    group,
    names: dict[nn.Module, str],
    example_input: torch.Tensor,
    macs: float,
) -> dict[str, dict[int, int]]:
    """For a group whose trace passes an op that may reorder channels: {module: {root channel: its channel}} of
    every consumer or norm where the measured arrival of each root channel is one channel and differs from the trace
    (a shuffle, a flip); measured only while the probe's forward pass costs at most PROBE_MACS (`macs` per sample)."""
    if not any(_may_reorder(item.dep.target) for item in group) or macs * _probe_batch(group) > PROBE_MACS:
        return {}
    traced: dict[str, dict[int, int]] = {}
    for item in group:
        module = item.dep.target.module
        is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
        if (
            isinstance(module, nn.Module)
            and module in names
            and (isinstance(module, NORM_TYPES) or not is_out)
        ):
            traced.setdefault(names[module], dict(zip(item.root_idxs, item.idxs)))
    root = names[group[0].dep.target.module]
    with preserved_modes(model):
        model.eval()
        sources = measured_sources(model, root, list(traced), example_input, len(group[0].idxs))
    corrections = {}
    for name, source in sources.items():
        measured = {root_channel: c for c, root_channel in enumerate(source) if root_channel >= 0}
        if set(measured) >= set(traced[name]) and any(measured[r] != c for r, c in traced[name].items()):
            corrections[name] = measured
    return corrections


def on_model_device(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` on the device of `model`'s first parameter or buffer (a model timed on a GPU is traced there)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return x if tensor is None else x.to(tensor.device)


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, leaving its train/eval modes as they were."""
    example_input = on_model_device(model, example_input)
    with preserved_modes(model), torch.enable_grad():
        try:
            return CouplingGraph().build_dependency(model, example_inputs=example_input, verbose=False)
        except (ZeroDivisionError, IndexError, KeyError, AttributeError, TypeError) as exc:
            raise MaskError(
                f"torch-pruning cannot trace this model's channel couplings ({type(exc).__name__}: "
                f"{str(exc)[:120]} in its dependency graph, e.g. a channel shuffle by reshape, or "
                "channel counts it cannot infer through a concatenation, as in Swin-S/B); exclude the "
                "affected layers or use another model"
            ) from None


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
    # layer -> module -> {root channel: its channel}, measured where a reshape permutes channels (channel_probe.py)
    channel_maps: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)

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

    def pruned_vector(self, mask: Sequence[str] | set[str]) -> torch.Tensor:
        """Bool vector over structures from a set of structure keys; unknown keys are a MaskError."""
        index = self.key_index()
        unknown = [k for k in mask if k not in index]
        if unknown:
            raise MaskError(
                f"{len(unknown)} mask keys are not structures of this model (e.g. {unknown[:3]}); "
                "the mask was made for another architecture or exclusion setting"
            )
        vec = torch.zeros(self.num_structures, dtype=torch.bool)
        if mask:
            vec[[index[k] for k in mask]] = True
        return vec


def _counted_module(m: nn.Module) -> bool:
    """Convs, linears and norms (also wrappers such as timm's BatchNormAct2d) and parameterised leaves."""
    own = any(True for _ in m.parameters(False))
    return isinstance(m, PRODUCER_TYPES + NORM_TYPES) or (own and next(m.children(), None) is None)


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
        kind = "depthwise" if _is_depthwise(m) else "conv"
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
class TracedGroup:
    """One coupled channel group as traced: its root, channels, structures (channel sets), the producers' and every
    touched module's (module, dim 0 in / 1 out, module idxs, root idxs) channels, and the consumers."""

    root: str
    channels: int
    members: list[list[int]]
    producers: dict[str, tuple[list[int], list[int]]]
    effects: list[tuple[str, int, list[int], list[int]]]
    consumers: list[str]


@dataclass
class ModuleTable:
    """Every module (and bare parameter) counted, in forward order, with where to find each by name or parameter."""

    infos: list[ModuleInfo]
    position: dict[str, int]  # module name -> index in `infos`
    param_names: dict[int, str]  # id(bare parameter) -> its name


def _module_table(model: nn.Module, order: list[str], shapes: dict, graph) -> ModuleTable:
    """The counted modules: those run in forward order, then those not run at inference (parameters, no MACs), then
    bare per-channel parameters as 'vector' modules."""
    module_names = list(order)
    module_names += [n for n, m in model.named_modules() if n not in shapes and _counted_module(m)]
    infos = [module_info(n, model.get_submodule(n), shapes.get(n, [])) for n in module_names]
    for info in infos:
        if info.name not in shapes:  # not run at inference (e.g. auxiliary heads): parameters, but no MACs
            info.positions = 0
    param_names: dict[int, str] = {}
    pruning_dims = {id(p): dim for p, dim in graph.unwrapped_parameters}
    for pname, p in _bare_parameters(model):
        channels = p.shape[pruning_dims.get(id(p), -1)] if p.ndim else 1
        infos.append(
            ModuleInfo(pname, "vector", channels, channels, 1, p.numel() // max(channels, 1), 1, False, 0)
        )
        param_names[id(p)] = pname
        module_names.append(pname)
    return ModuleTable(infos, {n: i for i, n in enumerate(module_names)}, param_names)


def _trace_group(
    group, graph, names: dict, table: ModuleTable, refused: dict[str, str]
) -> tuple[TracedGroup | None, str]:
    """The group's structures and what each module of it loses, or (None, why it cannot be pruned); (None, "") for a
    group without producers."""
    root = names[group[0].dep.target.module]
    size = len(group[0].idxs)
    producers: dict[str, tuple[list[int], list[int]]] = {}
    effects: list[tuple[str, int, list[int], list[int]]] = []
    grouped: list[tuple[str, int, int, list[int], list[int]]] = []
    consumers, transposed_out, beyond = [], [], ""
    coupled = [roots for item in group for roots in getattr(item, "coupled_roots", ())]
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        name = table.param_names.get(id(module)) if isinstance(module, nn.Parameter) else names.get(module)
        if name is None or name not in table.position:
            continue
        idxs, root_idxs = list(item.idxs), list(item.root_idxs)
        if isinstance(module, nn.Parameter):  # a bare per-channel parameter goes with the channel
            effects.append((name, 1, idxs, root_idxs))
            continue
        is_out = graph.is_out_channel_pruning_fn(handler)
        channels, groups = _channel_groups(module, is_out or isinstance(module, NORM_TYPES))
        if groups > 1 and all(g[0] != name or g[1] != channels for g in grouped):
            grouped.append((name, channels, groups, idxs, root_idxs))
        if isinstance(module, TRANSPOSED_TYPES) and is_out and module.groups > 1:
            transposed_out.append(name)
        elif isinstance(module, NORM_TYPES) or (isinstance(module, PRODUCER_TYPES) and is_out):
            if name not in producers:
                producers[name] = (idxs, root_idxs)
                effects.append((name, 1, idxs, root_idxs))
        elif isinstance(module, PRODUCER_TYPES):
            consumers.append(name)
            effects.append((name, 0, idxs, root_idxs))
            if max(idxs, default=0) >= _input_channels(module):
                beyond = beyond or (
                    f"its channels reach {name} through an op that changes the channel count (e.g. "
                    "pixel_shuffle, or a reshape that moves channels into space), which torch-pruning "
                    "cannot follow"
                )
    if not producers:
        return None, ""
    members, reason = _partition(size, grouped, coupled)
    reason = _unsupported(group, graph, names) or beyond or reason
    if transposed_out and not reason:
        reason = f"{transposed_out[0]} joins this group with " + GROUPED_TRANSPOSED_REASON
    reason = reason or refused.get(root, "")
    if reason:
        return None, reason
    return TracedGroup(root, size, members, producers, effects, consumers), ""


def _layer_of_group(
    model: nn.Module, traced: TracedGroup, depth: int, stage: str, offset: int, table: ModuleTable
) -> tuple[Layer, list[ProducerSlice], list[ProducerSlice], torch.Tensor]:
    """The traced group as a layer of the structure set, with its structures numbered from `offset`: the layer, its
    producers' and consumers' channel slices, and its rows of the removal matrix. Modules are assigned to the layer
    they are the root of, else to their first."""
    structure_of = torch.empty(traced.channels, dtype=torch.long)
    for s, channel_set in enumerate(traced.members):
        structure_of[channel_set] = s
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
    slices, consumed = [], []
    for name, (idxs, root_idxs) in traced.producers.items():
        slices.append(ProducerSlice(name, torch.tensor(idxs), structure_of[root_idxs] + offset))
        info = table.infos[table.position[name]]
        if info.layer < 0 or name == traced.root:
            info.layer = depth
    removal = torch.zeros(len(traced.members), 2 * len(table.infos), dtype=torch.float64)
    for name, dim, idxs, root_idxs in traced.effects:
        if dim == 0:
            consumed.append(ProducerSlice(name, torch.tensor(idxs), structure_of[root_idxs] + offset))
        removal[:, 2 * table.position[name] + dim].index_add_(
            0, structure_of[root_idxs], torch.ones(len(root_idxs), dtype=torch.float64)
        )
    return layer, slices, consumed, removal


def _channels_in_no_structure(
    model: nn.Module, names: dict, ignored: list, traced_groups: list[TracedGroup], unprunable: dict[str, str]
) -> dict[str, str]:
    """Producers some of whose output channels no traced structure holds (a coupling the graph cannot follow, such as
    a one-channel gate broadcast over a stream): those channels are kept, and each such producer is named with why."""
    covered: dict[str, set[int]] = {}
    roots: dict[str, str] = {}
    for traced in traced_groups:
        for name, (idxs, _) in traced.producers.items():
            covered.setdefault(name, set()).update(idxs)
            roots.setdefault(name, traced.root)
    found = {}
    for module, name in names.items():
        if (
            not isinstance(module, PRODUCER_TYPES)
            or module in ignored
            or name in unprunable
            or name not in covered
        ):
            continue
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        left = channels - len(covered[name] & set(range(channels)))
        if left > 0:
            found[name] = (
                f"{left} of its {channels} output channels belong to no structure: the traced graph couples it with "
                f"{roots[name]} and cannot follow the rest (an op without a channel rule, e.g. a gate broadcast over "
                "the channels); they are never pruned"
            )
    return found


def traced_structures(
    model: nn.Module,
    example_input: torch.Tensor,
    exclude: Sequence[str],
    preset: str | None,
    refused: dict[str, str] | None = None,
) -> StructureSet:
    """All prunable structures of `model` as torch-pruning traces them, with measured channel maps where an op
    reorders channels; the final classifier, layers matching `exclude` and the `refused` layers ({root: why}) are
    left out. `offered.find_structures` is what callers use: it also drops layers whose pruning was measured wrong."""
    refused = refused or {}
    if preset is not None and preset not in PRESETS:
        raise MaskError(f"unknown exclusion preset '{preset}'; known: {sorted(PRESETS)}")
    patterns = list(exclude) + list(PRESETS.get(preset, ()))
    names = {m: n for n, m in model.named_modules()}
    example_input = on_model_device(model, example_input)
    order, shapes = forward_records(model, example_input)
    producer_order = [n for n in order if isinstance(model.get_submodule(n), PRODUCER_TYPES)]
    if not producer_order:
        raise MaskError("the model has no convolution or linear layer to prune")
    classifier = producer_order[-1]
    ignored = [
        m for m, n in names.items() if n == classifier or any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]
    graph = build_graph(model, example_input)
    table = _module_table(model, order, shapes, graph)
    traced_groups: list[TracedGroup] = []
    unprunable: dict[str, str] = {}
    graph.channel_maps = {}
    sample_macs = sum(info.macs(info.in_channels, info.out_channels) for info in table.infos)
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=PRODUCER_TYPES):
        root = group[0].dep.target.module
        corrections = _permuted_channels(model, graph, group, names, example_input, sample_macs)
        if corrections:
            graph.channel_maps[names[root]] = corrections
            group = graph.get_pruning_group(root, group[0].dep.handler, list(range(len(group[0].idxs))))
        traced, reason = _trace_group(group, graph, names, table, refused)
        if traced is not None:
            traced_groups.append(traced)
        elif reason:
            unprunable[names[root]] = reason
    position = {n: i for i, n in enumerate(order)}
    traced_groups.sort(key=lambda t: position.get(t.root, len(position)))
    for name, m in model.named_modules():  # their own output channels: listed, never silently left out
        if isinstance(m, TRANSPOSED_TYPES) and m.groups > 1 and m not in ignored:
            unprunable.setdefault(name, GROUPED_TRANSPOSED_REASON)
    unprunable.update(_channels_in_no_structure(model, names, ignored, traced_groups, unprunable))
    if not traced_groups:
        why = "; ".join(f"{name}: {reason}" for name, reason in unprunable.items())
        raise MaskError(
            "no prunable channel group found: "
            + (why if why else "every group contains the classifier or an excluded layer")
        )
    stages = _stage_labels([shapes[t.root][0].output if t.root in shapes else () for t in traced_groups])
    layers, slices, consumed, removal, offset = [], [], [], [], 0
    for depth, traced in enumerate(traced_groups):
        layer, produced, taken, rows = _layer_of_group(model, traced, depth, stages[depth], offset, table)
        layers.append(layer)
        slices += produced
        consumed += taken
        removal.append(rows)
        offset += layer.size
    return StructureSet(
        signature=architecture_signature(model),
        layers=layers,
        keys=[f"{layer.name}:{s}" for layer in layers for s in range(layer.size)],
        layer_of=torch.tensor([layer.depth for layer in layers for _ in range(layer.size)]),
        producers=slices,
        modules=table.infos,
        removal=torch.cat(removal),
        excluded=[n for m, n in names.items() if m in ignored],
        unprunable=unprunable,
        consumed=consumed,
        channel_maps={
            name: maps for name, maps in graph.channel_maps.items() if name in {l.name for l in layers}
        },
    )
