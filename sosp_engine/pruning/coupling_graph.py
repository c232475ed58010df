"""torch-pruning's dependency graph with a coupled-group search that visits each (layer, channel) pair once.

torch-pruning 1.6 re-walks a layer whenever it arrives there with an index list it has not seen verbatim, and merges the
group in quadratic time. Where residual adds meet channel slices (ReXNet's `x[:, :c] + shortcut`) that walk grows with
every path through the blocks: one group of timm's rexnet_100 took over 10 minutes. Every index mapping of torch-pruning
maps each index on its own, so walking only the indices new to a (layer, pruning function) finds the same group.
"""

from __future__ import annotations

import typing
from numbers import Number

import torch.nn as nn
import torch_pruning as tp
from torch_pruning import _helpers
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.pruner import function

from ..errors import MaskError

# (layer, channel) pairs one group may walk: about 30x the largest group of the zoo matrix (a ViT-B/16 at 224), far
# beyond any real coupling; reached when torch-pruning reads reshapes as flattening channels into positions
WALK_LIMIT = 10_000_000


class CouplingGraph(tp.DependencyGraph):
    """A DependencyGraph whose `get_pruning_group` propagates only indices new to each (layer, pruning function), and
    takes measured channel maps (`channel_maps`: root module -> module -> {root channel: its channel}) over the
    trace's where a reshape permutes channels (see channel_probe.py)."""

    channel_maps: dict[str, dict[str, dict[int, int]]] = {}

    def get_pruning_group(
        self, module: nn.Module, pruning_fn: typing.Callable, idxs: typing.Sequence[int]
    ) -> Group:
        """The group of every layer coupled to pruning `idxs` of `module` with `pruning_fn`, merged per layer."""
        if module not in self.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        if (
            isinstance(module, tp.ops.TORCH_CONV)
            and module.groups == module.out_channels
            and module.out_channels > 1
        ):
            pruning_fn = function.prune_depthwise_conv_out_channels
        if isinstance(idxs, Number):
            idxs = [idxs]
        index_mapping.update_index_mapping(self)
        root = self.module2node[module]
        walk = _Walk(lambda: self._limit_error(module))
        walk.run(Dependency(pruning_fn, pruning_fn, source=root, target=root), idxs)
        return self._group_of(module, idxs, walk)

    def _limit_error(self, module: nn.Module) -> MaskError:
        return MaskError(
            f"torch-pruning's dependency graph couples the channels of {self._module2name[module]} "
            f"to over {WALK_LIMIT:,} (layer, position) pairs: it reads this model's reshapes as "
            "flattening channels into positions (as in Swin's window attention), so its channel "
            "couplings cannot be followed; exclude those layers (--exclude) or use another model"
        )

    def _group_of(self, module: nn.Module, idxs: typing.Sequence[int], walk: "_Walk") -> Group:
        """The walked layers as one torch-pruning group (measured channel maps over the trace's), merged per layer."""
        group = Group()
        measured = self.channel_maps.get(self._module2name.get(module, ""), {})
        for key in walk.order:
            dep, kept = walk.reached[key]
            channel_map = measured.get(self._module2name.get(dep.target.module, ""))
            if channel_map is not None:
                kept = {channel_map[i]: [i] for i in idxs}
            if isinstance(dep.target.module, nn.Parameter) and any(
                dep.target.module is p for p in self.ignored_params
            ):
                continue
            item = _helpers.GroupItem(dep, list(kept))
            item.root_idxs = [
                roots[0] for roots in kept.values()
            ]  # as torch-pruning's merge: the first root wins
            # a channel reached from several root channels couples them (GhostNet: a depthwise conv maps the primary
            # conv's channel c to the concatenation's channel c + width, so both are removed together)
            item.coupled_roots = [roots for roots in kept.values() if len(set(roots)) > 1]
            group._group.append(item)
        group._DG = self
        return group


class _Walk:
    """One group search: each (layer, pruning function) is walked on from only the (index, root index) pairs new to
    it, so a layer reached again with indices it has seen stops there."""

    def __init__(self, limit_error: typing.Callable[[], MaskError]) -> None:
        self.limit_error = limit_error
        self.order: list[tuple] = []  # (target node, handler) in the order first reached
        self.reached: dict[
            tuple, tuple[Dependency, dict]
        ] = {}  # -> (first dependency, {idx: every root idx})
        self.seen: dict[tuple, set] = {}  # -> every (idx, root idx) pair walked from there
        self.walked = 0

    def arrive(self, dep: Dependency, hybrid: list) -> list:
        """Record the pairs `dep` brings to its target; returns those new there (the ones to walk on)."""
        key = (dep.target, dep.handler)
        walked = self.seen.setdefault(key, set())
        fresh = [i for i in hybrid if i not in walked]
        walked.update(fresh)
        self.walked += len(fresh)
        if self.walked > WALK_LIMIT:
            raise self.limit_error()
        if key not in self.reached:
            self.reached[key] = (dep, {})
            self.order.append(key)
        kept = self.reached[key][1]
        for i in fresh:
            kept.setdefault(i.idx, []).append(i.root_idx)
        return fresh

    def run(self, first: Dependency, idxs: typing.Sequence[int]) -> None:
        """Walk every dependency triggered from `first` pruning `idxs`, depth first."""
        stack = [(first, self.arrive(first, [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]))]
        while stack:
            dep, hybrid = stack.pop()
            for new_dep in dep.target.dependencies:
                if not new_dep.is_triggered_by(dep.handler):
                    continue
                mapped = hybrid
                for mapping in new_dep.index_mapping:
                    if mapping is not None:
                        mapped = mapping(mapped)
                fresh = self.arrive(new_dep, mapped) if mapped else []
                if fresh:
                    stack.append((new_dep, fresh))
