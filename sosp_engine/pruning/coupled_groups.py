"""From a channel trace to layers: producers whose channels share a class form one layer, each class of a layer is
one structure, and every module dimension or bare parameter that holds a class's channels loses them with it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .channel_rules import varies
from .channel_trace import ChannelTrace


@dataclass
class TracedGroup:
    """One layer as traced: its root (first producer), the root's channel count, each structure's root channels, every
    producer's and touched module's (module, dim 0 in / 1 out, module channels, their structure) and the consumers."""

    root: str
    channels: int
    members: list[list[int]]
    producers: dict[str, tuple[list[int], list[int]]]
    effects: list[tuple[str, int, list[int], list[int]]]
    consumers: list[str]
    measured: list[str] = field(
        default_factory=list
    )  # ops that fix its sizes in the graph (its pruning is measured)
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention module -> structure of each head


def parameter_axes(trace: ChannelTrace) -> dict[str, int]:
    """The axis of each bare parameter along which its channels run (the one axis its classes vary along)."""
    axes = {}
    for name, ids in trace.parameters.items():
        classes = trace.class_of(ids)
        varying = [a for a in range(classes.ndim) if varies(classes, a)]
        if len(varying) == 1:
            axes[name] = varying[0]
    return axes


class _Layers:
    """Producers merged into layers wherever their output channels share a class (union-find over names)."""

    def __init__(self, names: list[str]) -> None:
        self.parent = {n: n for n in names}

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _layer_members(trace: ChannelTrace, order: dict[str, int]) -> dict[str, list[str]]:
    """Root (first producer in forward order) -> the producers of its layer, in forward order."""
    names = sorted(trace.outputs, key=lambda n: order.get(n, len(order)))
    layers = _Layers(names)
    first: dict[int, str] = {}
    for name in names:
        for c in trace.class_of(trace.outputs[name]).unique().tolist():
            if c in first:
                layers.join(first[c], name)
            else:
                first[c] = name
    members: dict[str, list[str]] = {}
    for name in names:
        members.setdefault(layers.find(name), []).append(name)
    return members


def _pieces(classes: torch.Tensor, structure_index: torch.Tensor) -> tuple[list[int], list[int]]:
    """(channel, structure) of each channel whose class is one of the layer's (`structure_index`: class -> its
    structure in the layer, -1 for classes of other layers)."""
    found = torch.where(classes >= 0, structure_index[classes.clamp(min=0)], -1)
    idxs = (found >= 0).nonzero().flatten()
    return idxs.tolist(), found[idxs].tolist()


def _parameter_effects(
    trace: ChannelTrace, name: str, structure_index: torch.Tensor, axes: dict[str, int]
) -> tuple[tuple[str, int, list[int], list[int]] | None, str]:
    """A bare parameter's share of the layer's channels, along its channel axis; or why it cannot be cut."""
    if name not in axes:
        return None, f"the parameter {name} holds its channels along several axes at once"
    classes = trace.class_of(trace.parameters[name])
    along = classes.movedim(axes[name], 0).reshape(classes.shape[axes[name]], -1)[:, 0]
    idxs, structures = _pieces(along, structure_index)
    return (name, 1, idxs, structures), ""


@dataclass
class _Touches:
    """Every traced module dimension and bare parameter with its channels' classes, and the layers each touches."""

    classes: dict[tuple[str, str], torch.Tensor]  # (kind, name) -> class of each channel / element
    layers: dict[int, list[tuple[str, str]]]  # layer -> the (kind, name) that hold some of its channels


def _touches(trace: ChannelTrace, layer_of_class: torch.Tensor) -> _Touches:
    classes = {("norm", n): trace.class_of(ids) for n, ids in trace.norms.items()}
    classes |= {("input", n): trace.class_of(ids) for n, ids in trace.inputs.items()}
    classes |= {("parameter", n): trace.class_of(ids) for n, ids in trace.parameters.items()}
    layers: dict[int, list[tuple[str, str]]] = {}
    for key, cls in classes.items():
        known = cls[cls >= 0]
        for g in layer_of_class[known].unique().tolist():
            if g >= 0:
                layers.setdefault(g, []).append(key)
    return _Touches(classes, layers)


def _group(
    trace: ChannelTrace, root: str, producers: list[str], touches: _Touches, g: int, axes: dict[str, int]
) -> tuple[TracedGroup | None, str]:
    """The layer rooted at `root` (layer number `g`), or (None, why it cannot be pruned)."""
    out_classes = {n: trace.class_of(trace.outputs[n]) for n in producers}
    order = list(dict.fromkeys(c for n in producers for c in out_classes[n].tolist()))
    blocked = [c for c in order if c in trace.blocked]
    if blocked:
        return None, trace.blocked[blocked[0]]
    structure_index = torch.full((len(trace.classes),), -1, dtype=torch.long)
    structure_index[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    root_structures = structure_index[out_classes[root]]
    members = [[] for _ in order]
    for i, s in enumerate(root_structures.tolist()):
        members[s].append(i)
    slices = {n: _pieces(out_classes[n], structure_index) for n in producers}
    effects = [(n, 1, idxs, st) for n, (idxs, st) in slices.items()]
    consumers = []
    for kind, name in touches.layers.get(g, []):
        if kind == "parameter":
            effect, why = _parameter_effects(trace, name, structure_index, axes)
            if effect is None:
                return None, why
            effects.append(effect)
            continue
        idxs, st = _pieces(touches.classes[(kind, name)], structure_index)
        if kind == "norm":
            slices[name] = (idxs, st)
        else:
            consumers.append(name)
        effects.append((name, 1 if kind == "norm" else 0, idxs, st))
    measured = sorted({where for c in order for where in trace.measured.get(c, [])})
    heads = {}
    for module, calls in trace.heads.items():
        head_classes = list(dict.fromkeys(trace.class_of(calls[0]).tolist()))
        if head_classes and all(int(structure_index[c]) >= 0 for c in head_classes):
            heads[module] = [int(structure_index[c]) for c in head_classes]
    group = TracedGroup(root, len(root_structures), members, slices, effects, consumers, measured, heads)
    return group, ""


def coupled_groups(
    trace: ChannelTrace, order: dict[str, int], ignored: set[str], axes: dict[str, int]
) -> tuple[list[TracedGroup], dict[str, str], dict[str, str]]:
    """The layers of a trace in forward order, the unprunable producers ({producer: why}) and the held-back ones
    ({producer: the excluded module of its layer}: the classifier, a user's or a preset's exclusion). `axes` are the
    bare parameters' channel axes (`parameter_axes`)."""
    members = _layer_members(trace, order)
    layer_of_class = torch.full((len(trace.classes),), -1, dtype=torch.long)
    for g, producers in enumerate(members.values()):
        for name in producers:
            layer_of_class[trace.class_of(trace.outputs[name])] = g
    touches = _touches(trace, layer_of_class)
    groups, unprunable, excluded = [], {}, {}
    for g, (root, producers) in enumerate(members.items()):
        held = [n for n in producers if n in ignored]
        if held:
            excluded |= {n: held[0] for n in producers}
            continue
        group, why = _group(trace, root, producers, touches, g, axes)
        if group is None:
            for name in producers:
                unprunable[name] = why if name == root else f"coupled with {root}: {why}"
        else:
            groups.append(group)
    return groups, unprunable, excluded
