"""The engine's own channel tracer: which channels of which modules must be removed together, read off the model's
ATen graph (`torch.export`, non-strict) one op at a time.

Each producer (a conv or linear) gives every output channel an id; each bare parameter (layer scale, position
embedding, relative position table) every element. The graph runs once on the example input with a label tensor beside
every value (channel_rules.py says how each op moves labels); ids that meet in an op are coupled, and the coupled
classes are the structures. Modules are read here, by their parameters: convolutions (grouped, depthwise with a
multiplier, transposed, 1d/2d/3d), linears and norms.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Collection

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from ..errors import MaskError
from .channel_rules import NONE, OpCall, is_labelled, rule_of, varies

NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + TRANSPOSED_TYPES
PRODUCER_TYPES = CONV_TYPES + (nn.Linear,)
GROUPED_TRANSPOSED_REASON = (
    "a grouped transposed convolution's output channels: each group holds them in its own block of weight "
    "columns, which the engine does not split into structures (its input channels are pruned with the layer "
    "that feeds it)"
)
MODULE_OPS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "linear",
    "batch_norm",
    "layer_norm",
    "group_norm",
    "instance_norm",
}
RESHAPING_OPS = {
    "view",
    "reshape",
    "_unsafe_view",
    "unflatten",
    "flatten",
    "pixel_shuffle",
    "pixel_unshuffle",
}
FIXED_SIZE_OPS = {
    "split",
    "split_with_sizes",
    "slice",
    "narrow",
    "tensor_split",
    "select",
}  # sizes fixed in the graph


def is_depthwise(m: nn.Module) -> bool:
    """A conv with one group per input channel (any channel multiplier)."""
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups > 1 and m.groups == m.in_channels


@dataclass
class ChannelTrace:
    """What one trace found: ids per channel of each module dimension, ids of each bare parameter, and the class
    (structure-to-be) of every id, with the reasons that keep some classes whole."""

    outputs: dict[str, torch.Tensor]  # conv / linear (depthwise too) -> id of each output channel
    norms: dict[str, torch.Tensor]  # norm -> id of each channel
    inputs: dict[str, torch.Tensor]  # conv / linear -> id of each input channel (-1: none)
    parameters: dict[str, torch.Tensor]  # bare parameter -> id of each element
    classes: torch.Tensor  # class of each id
    blocked: dict[int, str]  # class -> why it cannot be pruned
    measured: dict[
        int, list[str]
    ]  # class -> the ops that fix its sizes in the graph (its pruning is measured)
    heads: dict[str, list[torch.Tensor]] = field(
        default_factory=dict
    )  # module -> head ids of each attention call
    shared: list[str] = field(default_factory=list)  # producers whose output is one for the whole batch

    def class_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Class of each id (-1 stays -1)."""
        ids = ids.long()
        found = torch.full_like(ids, -1)
        known = ids >= 0
        found[known] = self.classes[ids[known]]
        return found


class Tracer:
    """Runs an exported graph on values and labels side by side and records what the rules couple."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.count = 0
        self.pairs: list[torch.Tensor] = []
        self.blocks: list[tuple[torch.Tensor, str]] = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.norms: dict[str, list[torch.Tensor]] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.parameters: dict[str, torch.Tensor] = {}
        self.measured: list[tuple[torch.Tensor, str]] = []
        self.heads_of: dict[str, list[torch.Tensor]] = {}
        self.per_sample: set[str] = (
            set()
        )  # graph values that depend on the input (the rest: one for the batch)
        self.shared: set[str] = (
            set()
        )  # producers whose output is one for the whole batch (a position-bias MLP)
        self.batch_shared = False  # the module op being read runs on no input-dependent value
        self.grids: list[torch.Tensor] = []  # (outer, inner) ids of each channel axis a reshape split in two
        self.where = ""
        self.module_path = ""

    # --- what the rules record (channel_rules.Coupling) ---
    def couple(self, labels) -> None:
        base = labels[0].reshape(-1)
        for other in labels[1:]:
            other = other.reshape(-1)
            both = (base >= 0) & (other >= 0) & (base != other)
            if bool(both.any()):
                self._pairs(base[both], other[both])

    def couple_within(self, labels: torch.Tensor, dim: int) -> None:
        moved = labels.movedim(dim, 0).reshape(labels.shape[dim], -1)
        first = moved.amax(1, keepdim=True).expand_as(moved)
        keep = (moved >= 0) & (moved != first)
        if bool(keep.any()):
            self._pairs(moved[keep], first[keep])

    def block(self, labels: torch.Tensor, why: str) -> None:
        ids = labels[labels >= 0].unique().long()
        if ids.numel():
            self.blocks.append((ids, why))

    def heads(self, ids: torch.Tensor) -> None:
        self.heads_of.setdefault(self.module_path, []).append(ids.long().clone())

    def _pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        code = torch.unique(a.long() * (1 << 31) + b.long())
        self.pairs.append(torch.stack([code >> 31, code & ((1 << 31) - 1)], 1))

    # --- ids ---
    def new_ids(self, count: int) -> torch.Tensor:
        ids = torch.arange(self.count, self.count + count, dtype=torch.float64)
        self.count += count
        return ids

    def producer_ids(self, name: str, channels: int) -> torch.Tensor:
        """The ids of a producer's output channels: the same on every call of a reused module."""
        if name not in self.outputs:
            self.outputs[name] = self.new_ids(channels)
        if self.batch_shared:
            self.shared.add(name)
        return self.outputs[name]

    def _classes(self) -> torch.Tensor:
        """The connected components of the coupled pairs: the class of every id."""
        if not self.pairs:
            return torch.arange(self.count)
        pairs = torch.cat(self.pairs).numpy()
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(self.count, self.count))
        _, classes = connected_components(graph, directed=False)
        return torch.from_numpy(classes.astype(np.int64))

    def finish(self) -> ChannelTrace:
        """Couple the channels each module reads on its several calls, then the classes of every id."""
        for table in (self.norms, self.inputs):
            for calls in table.values():
                for later in calls[1:]:
                    self.couple([calls[0], later])
        classes, pending = self._classes(), list(self.grids)
        while pending:  # a split channel axis keeps its grid rectangular: else its columns go together
            broken = [g for g in pending if not _whole_rows_or_columns(_class_grid(classes, g))]
            if not broken:
                break
            self.couple_within(broken[0], 1)
            pending = [g for g in pending if g is not broken[0]]
            classes = self._classes()
        blocked: dict[int, str] = {}
        for ids, why in self.blocks:
            for c in classes[ids].unique().tolist():
                blocked.setdefault(c, why)
        measured: dict[int, list[str]] = {}
        for ids, where in self.measured:
            for c in classes[ids].unique().tolist():
                if where not in measured.setdefault(c, []):
                    measured[c].append(where)
        return ChannelTrace(
            outputs={n: ids.long() for n, ids in self.outputs.items()},
            norms={n: calls[0].long() for n, calls in self.norms.items()},
            inputs={n: calls[0].long() for n, calls in self.inputs.items()},
            parameters={n: ids.long() for n, ids in self.parameters.items()},
            classes=classes,
            blocked=blocked,
            measured=measured,
            heads=self.heads_of,
            shared=sorted(self.shared),
        )


def _per_channel(tracer: Tracer, labels: torch.Tensor | None, dim: int, size: int) -> torch.Tensor:
    """One id per channel along `dim` (every id within a channel coupled first), -1 where the channel holds none."""
    if labels is None:
        return torch.full((size,), NONE, dtype=torch.float64)
    tracer.couple_within(labels, dim)
    return labels.movedim(dim, 0).reshape(size, -1).amax(1)


def _couple_group_positions(tracer: Tracer, ids: torch.Tensor, groups: int) -> None:
    """Channels at one local position of every group go together, so each group keeps as many (grouped convs,
    GroupNorm)."""
    if groups > 1 and ids.numel() % groups == 0:
        tracer.couple_within(ids.reshape(groups, -1), 1)


def _channel_labels(ids: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """A label tensor of `shape` holding `ids[c]` at channel c of axis `dim`."""
    view = [1] * len(shape)
    view[dim] = -1
    return ids.reshape(view).expand(shape).clone()


def _conv(tracer: Tracer, name: str, m: nn.Module, x: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    dim = out.ndim - len(m.kernel_size) - 1
    in_ids = _per_channel(tracer, x, dim, m.in_channels)
    tracer.inputs.setdefault(name, []).append(in_ids)
    transposed = isinstance(m, TRANSPOSED_TYPES)
    if is_depthwise(m):
        multiplier = m.out_channels // m.in_channels
        passed = in_ids.repeat_interleave(multiplier)
        if name not in tracer.outputs:
            fresh = tracer.new_ids(m.out_channels)
            tracer.outputs[name] = torch.where(passed >= 0, passed, fresh)
        tracer.couple([tracer.outputs[name], passed])
        return _channel_labels(tracer.outputs[name], out.shape, dim)
    _couple_group_positions(tracer, in_ids, m.groups)
    out_ids = tracer.producer_ids(name, m.out_channels)
    if transposed and m.groups > 1:
        tracer.block(out_ids, f"{name}: " + GROUPED_TRANSPOSED_REASON)
    else:
        _couple_group_positions(tracer, out_ids, m.groups)
    return _channel_labels(out_ids, out.shape, dim)


def _linear(
    tracer: Tracer, name: str, m: nn.Linear, x: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    tracer.inputs.setdefault(name, []).append(_per_channel(tracer, x, -1 % max(out.ndim, 1), m.in_features))
    return _channel_labels(tracer.producer_ids(name, m.out_features), out.shape, out.ndim - 1)


def _norm(
    tracer: Tracer, name: str, m: nn.Module, x: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor | None:
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            if x is not None:
                tracer.block(x, f"{name} normalises over several axes at once ({tuple(m.normalized_shape)})")
            return None
        dim = out.ndim - 1
    else:
        dim = 1 if out.ndim > 1 else 0
    ids = _per_channel(tracer, x, dim, out.shape[dim])
    if isinstance(m, nn.GroupNorm):
        _couple_group_positions(tracer, ids, m.num_groups)
    tracer.norms.setdefault(name, []).append(ids)
    return _channel_labels(ids, out.shape, dim)


def _computed_weight(
    tracer: Tracer, name: str, m: nn.Module, x: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """A conv or linear that computes the weight it applies in forward (weight standardisation, a gain): its
    channels are its weight's rows and columns as for any producer, and its pruning is measured before offered;
    parameters besides weight and bias would be left uncut, so such a module keeps its channels."""
    labels = _conv(tracer, name, m, x, out) if isinstance(m, CONV_TYPES) else _linear(tracer, name, m, x, out)
    extra = [n for n, _ in m.named_parameters(recurse=False) if n not in ("weight", "bias")]
    if extra:
        why = f"{name} computes its weight in forward from parameters the engine does not cut ({', '.join(extra)})"
        tracer.block(tracer.outputs[name], why)
        if x is not None:
            tracer.block(x, why)
    else:
        tracer.measured.append((tracer.outputs[name].long(), f"the weight {name} computes in forward"))
    return labels


def _module_of(tracer: Tracer, parameter: str | None) -> tuple[str, nn.Module | None]:
    if parameter is None:
        return "", None
    name = parameter.rpartition(".")[0]
    return name, tracer.modules.get(name)


def _module_call(
    tracer: Tracer, op: str, kwargs: dict, labels: dict, out: torch.Tensor, owners: dict
) -> object:
    """A conv / linear / norm op, read through the module that owns its weight (or running mean)."""
    weight = owners.get(kwargs.get("weight")) or owners.get(kwargs.get("running_mean"))
    name, m = _module_of(tracer, weight)
    x = labels.get("input")
    x = x if is_labelled(x) else None
    if op.startswith("conv") and isinstance(m, CONV_TYPES):
        return _conv(tracer, name, m, x, out)
    if op == "linear" and isinstance(m, nn.Linear):
        return _linear(tracer, name, m, x, out)
    if op.endswith("norm") and isinstance(m, NORM_TYPES):
        return _norm(tracer, name, m, x, out)
    if op.endswith("norm") and m is None and x is not None:  # a functional norm without parameters
        dim = out.ndim - 1 if op == "layer_norm" else 1
        if op == "layer_norm" and len(kwargs.get("normalized_shape", [0])) != 1:
            tracer.block(x, f"{tracer.where} normalises over several axes at once")
            return None
        return x.clone() if dim < x.ndim else None
    caller = tracer.modules.get(tracer.module_path)
    if weight is None and isinstance(caller, CONV_TYPES + (nn.Linear,)):
        return _computed_weight(tracer, tracer.module_path, caller, x, out)
    if x is not None:
        owner = f"{weight} ({type(m).__name__})" if weight else "a computed weight"
        tracer.block(
            x,
            f"{tracer.where} reads its weight from {owner}; the engine prunes through nn.Linear, nn.ConvNd and norm "
            "modules only",
        )
    return None


def _stack_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _labels_of(value: object, real: object) -> object:
    """Label arguments for a rule: labels where traced, real integer / bool tensors (indices, masks) as they are,
    -1 for other unlabelled tensors."""
    if isinstance(real, (tuple, list)):
        value = value if isinstance(value, (tuple, list)) else [None] * len(real)
        return type(real)(_labels_of(v, r) for v, r in zip(value, real))
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(real, torch.Tensor):
        if real.is_floating_point() or real.is_complex():
            return torch.full(real.shape, NONE, dtype=torch.float64)
        return real
    return real


def _exported(model: nn.Module, example_input: torch.Tensor):
    try:
        return torch.export.export(model, (example_input,), strict=False)
    except Exception as exc:  # torch.export raises many types; each is the same news: no graph to read
        raise MaskError(
            f"torch.export cannot trace this model ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            "the engine reads channel couplings from its graph"
        ) from None


TRACE_CACHE_SIZE = 32
_traces: OrderedDict[tuple, ChannelTrace] = OrderedDict()


def forget_traces() -> None:
    """Empty the trace cache (a benchmark that times a trace from scratch)."""
    _traces.clear()


def _plain(value: object) -> object:
    """A module attribute as a cache key part: plain values as they are, callables and classes by identity."""
    if isinstance(value, (int, float, bool, str, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    if callable(value) and not isinstance(value, torch.Tensor):
        return value
    return type(value)


def _architecture_key(model: nn.Module, example_input: torch.Tensor, bare: Collection[str]) -> tuple:
    """What a trace depends on: every module's class and plain attributes (a flag that changes the forward), the
    parameters' and buffers' shapes, the example's shape, dtype and device. Weights do not enter a trace."""
    modules = tuple(
        (name, type(m), tuple(sorted((k, _plain(v)) for k, v in vars(m).items() if not k.startswith("_"))))
        for name, m in model.named_modules()
    )
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in model.state_dict().items())
    return (
        modules,
        tensors,
        tuple(example_input.shape),
        example_input.dtype,
        str(example_input.device),
        tuple(bare),
    )


def trace_channels(model: nn.Module, example_input: torch.Tensor, bare: Collection[str]) -> ChannelTrace:
    """Which channels go together in `model` (in eval mode; its modes are left as they were by the caller). `bare`
    names the parameters no module rule reads (layer scales, embeddings), labelled element by element. One trace per
    architecture and input shape in a process: a trace reads code and shapes, never weights."""
    try:
        key = _architecture_key(model, example_input, sorted(bare))
        hash(key)
    except TypeError:  # an attribute that cannot be hashed: traced every time
        return _traced(model, example_input, bare)
    if key not in _traces:
        _traces[key] = _traced(model, example_input, bare)
        while len(_traces) > TRACE_CACHE_SIZE:
            _traces.popitem(last=False)
    _traces.move_to_end(key)
    return _traces[key]


def _traced(model: nn.Module, example_input: torch.Tensor, bare: Collection[str]) -> ChannelTrace:
    program = _exported(model, example_input)
    tracer = Tracer(model)
    owners: dict[str, str] = {}
    values: dict[str, tuple[object, object]] = {}
    state = {**program.state_dict, **program.constants}
    weights = {  # parameters read as a module op's weight are read by that op's rule, not labelled per element
        arg.name
        for node in program.graph.nodes
        if node.op == "call_function"
        and hasattr(node.target, "name")
        and node.target.name().split("::")[-1].split(".")[0] in MODULE_OPS
        for arg in node.args[1:2]
        if isinstance(arg, torch.fx.Node)
    }
    for spec in program.graph_signature.input_specs:
        node_name, target = spec.arg.name, spec.target
        if target is None:
            values[node_name] = (example_input, None)
            tracer.per_sample.add(node_name)
            continue
        owners[node_name] = target
        real = state[target]
        labels = None
        if spec.kind.name == "PARAMETER" and target in bare and node_name not in weights:
            labels = tracer.new_ids(real.numel()).reshape(real.shape)
            tracer.parameters[target] = labels
        values[node_name] = (real, labels)
    for node in program.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            for item in _flat(node.args):
                labels = values[item.name][1] if isinstance(item, torch.fx.Node) else None
                if is_labelled(labels):
                    tracer.block(labels, "its channels are the model's output")
            break
        if node.op == "get_attr":
            values[node.name] = (getattr(program.graph_module, node.target), None)
            continue
        if any(n.name in tracer.per_sample for n in node.all_input_nodes):
            tracer.per_sample.add(node.name)
        values[node.name] = _run_node(tracer, node, values, owners)
    return tracer.finish()


def _run_node(tracer: Tracer, node: torch.fx.Node, values: dict, owners: dict) -> tuple[object, object]:
    """The node's real value and labels."""
    real_args = torch.fx.node.map_arg(node.args, lambda n: values[n.name][0])
    real_kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n.name][0])
    label_args = torch.fx.node.map_arg(node.args, lambda n: values[n.name][1])
    label_kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n.name][1])
    real = node.target(*real_args, **real_kwargs)
    if node.target is operator.getitem:
        labels = label_args[0]
        return real, labels[node.args[1]] if isinstance(labels, (tuple, list)) else None
    op = (
        node.target.name().split("::")[-1].split(".")[0] if hasattr(node.target, "name") else str(node.target)
    )
    if op not in MODULE_OPS and not any(is_labelled(v) for v in _flat(label_args) + _flat(label_kwargs)):
        return real, None
    tracer.module_path = _stack_path(node)
    tracer.where = f"{op} in {tracer.module_path or 'the model'}"
    normal = node.normalized_arguments(node.graph.owning_module, normalize_to_only_use_kwargs=True)
    names = dict(normal.kwargs) if normal is not None else {}
    if op in MODULE_OPS:
        tracer.batch_shared = node.name not in tracer.per_sample
        name_of = {k: getattr(v, "name", None) for k, v in names.items()}
        label_named = {k: values[v.name][1] if isinstance(v, torch.fx.Node) else v for k, v in names.items()}
        return real, _module_call(tracer, op, name_of, label_named, real, owners)
    rule = rule_of(op)
    labelled = [v for v in _flat(label_args) + _flat(label_kwargs) if is_labelled(v)]
    if rule is None:
        for labels in labelled:
            tracer.block(labels, f"{tracer.where} has no channel rule in the engine")
        return real, None
    named_labels = torch.fx.node.map_arg(names, lambda n: values[n.name][1])
    named_real = torch.fx.node.map_arg(names, lambda n: values[n.name][0])
    call = OpCall(
        node.target,
        tuple(_labels_of(a, r) for a, r in zip(label_args, real_args)),
        {k: _labels_of(label_kwargs[k], real_kwargs[k]) for k in label_kwargs},
        {k: _labels_of(named_labels[k], named_real[k]) for k in names},
        real,
        tracer.where,
    )
    try:
        labels = rule(tracer, call)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        for value in labelled:
            tracer.block(value, f"{tracer.where}: its channel rule failed ({str(exc).splitlines()[0][:100]})")
        return real, None
    if op in RESHAPING_OPS and isinstance(labels, torch.Tensor) and len(labelled) == 1:
        if sum(varies(labelled[0], d) for d in range(labelled[0].ndim)) == 1:
            grid = _split_grid(labels)
            if grid is not None:
                tracer.grids.append(grid.clone())
    for value in labelled if op in RESHAPING_OPS | FIXED_SIZE_OPS else []:
        dim = call.named.get("dim", 0) if op in FIXED_SIZE_OPS else None
        along = range(value.ndim) if dim is None else [dim if isinstance(dim, int) else 0]
        if any(varies(value, d) for d in along):
            tracer.measured.append((value[value >= 0].unique().long(), tracer.where))
    return real, labels


def _split_grid(labels: torch.Tensor) -> torch.Tensor | None:
    """The (outer, inner) ids where a reshape's output holds channels along exactly two axes (a channel shuffle's
    (groups, C / groups), heads x head_dim), else None."""
    varying = [d for d in range(labels.ndim) if varies(labels, d)]
    if len(varying) != 2:
        return None
    grid = labels
    for d in reversed(range(labels.ndim)):
        if d not in varying:
            grid = grid.select(d, 0)
    return grid


def _class_grid(classes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    ids = grid.long()
    return torch.where(ids >= 0, classes[ids.clamp(min=0)], -1)


def _whole_rows_or_columns(grid: torch.Tensor) -> bool:
    """Whether every class fills whole rows or whole columns of the grid (so removing it keeps the grid
    rectangular)."""
    rows, cols = grid.shape
    for c in grid.unique().tolist():
        if c < 0:
            continue
        held = grid == c
        count = int(held.sum())
        if count != int(held.any(1).sum()) * cols and count != int(held.any(0).sum()) * rows:
            return False
    return True


def _flat(value: object) -> list:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flat(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    return [value]
