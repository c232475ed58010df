"""How much of each layer an order may prune, and orders regrouped so that kept widths are multiples of a number."""

from __future__ import annotations

import math

import torch

from ..errors import AnalysisError
from .structures import StructureSet


def layer_limit(size: int, cap: float, min_channels: int = 1) -> int:
    """How many of a layer's `size` structures may be pruned: at most `cap` of them, and `min_channels` (at least
    one) stay."""
    return max(0, min(math.floor(cap * size + 1e-9), size - max(1, min_channels)))


def rounded_order(
    order: torch.Tensor,
    n_prunable: int,
    structures: StructureSet,
    round_to: int,
    cap: float = 0.95,
    min_channels: int = 1,
) -> tuple[torch.Tensor, int]:
    """The order regrouped so that every prefix keeps a multiple of `round_to` structures in each layer.

    Each layer's structures, in the order's sequence, form chunks: first `size mod round_to` of them (if any), then
    `round_to` at a time; a chunk is pruned when its last member would be. At least `round_to` structures stay in a
    layer (all of a narrower one), at least `min_channels` stay and at most `cap` of it is pruned, so caps and targets
    keep their meaning; widths that are multiples of 8 or 16 run as fast as their MACs on real kernels.
    """
    if round_to < 1:
        raise AnalysisError(f"--round-to must be at least 1, got {round_to}")
    if round_to == 1:
        return order, n_prunable
    position = {s: i for i, s in enumerate(order[:n_prunable].tolist())}
    members: list[list[int]] = [[] for _ in structures.layers]
    for s in order[:n_prunable].tolist():
        members[int(structures.layer_of[s])].append(s)
    chunks: list[tuple[int, list[int]]] = []
    for g, layer in enumerate(structures.layers):
        limit = min(layer_limit(layer.size, cap, min_channels), layer.size - round_to)
        kept = (
            -(-(layer.size - limit) // round_to) * round_to
        )  # the narrowest width allowed: a multiple of round_to
        taken = members[g][: max(layer.size - kept, 0)]
        first = layer.size % round_to
        bounds = ([first] if first else []) + list(range(first + round_to, len(taken) + 1, round_to))
        start = 0
        for end in bounds:
            if end > len(taken):
                break
            chunk = taken[start:end]
            chunks.append((position[chunk[-1]], chunk))
            start = end
    chunks.sort()
    chosen = [s for _, chunk in chunks for s in chunk]
    chosen_set = set(chosen)
    rest = [s for s in order.tolist() if s not in chosen_set]
    return torch.tensor(chosen + rest, dtype=torch.long), len(chosen)


def rounded_stops(order: torch.Tensor, n_prunable: int, structures: StructureSet, round_to: int) -> list[int]:
    """The prefix lengths of a rounded order at which every layer keeps a multiple of `round_to` structures."""
    sizes = structures.layer_sizes().tolist()
    counts = [0] * len(sizes)
    stops = [0]
    for i, s in enumerate(order[:n_prunable].tolist()):
        g = int(structures.layer_of[s])
        counts[g] += 1
        if (sizes[g] - counts[g]) % round_to == 0:
            stops.append(i + 1)
    return stops
