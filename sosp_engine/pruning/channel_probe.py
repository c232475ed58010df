"""Where each output channel of a producer really arrives, measured, for channel groups whose trace passes a reshape.

torch-pruning maps channel indices through a reshape as if it kept their order, so a channel shuffle
(`view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)`) or any other permutation by reshape is read as the
identity. One forward pass of a small batch shows where each channel lands. For every bit b of the channel index,
one sample carries a large marker on the producer's channels whose bit b is 1 and another on those whose bit b is 0
(each once added and once subtracted, so an activation that clips one sign still passes the other). A later module's
input channel that a single producer channel reaches changes in exactly one sample of each pair, and the pattern
spells that channel's index; a channel that changes in both (an op mixing channels, e.g. a LayerNorm) or in none
(not reached) has no measured source.
"""

from __future__ import annotations

import torch
from torch import nn


class _Seen(Exception):
    """Every target's input is recorded."""


def _channel_axis(module: nn.Module, x: torch.Tensor) -> int:
    return x.ndim - 1 if isinstance(module, nn.Linear) or x.ndim <= 2 else 1


def _markings(channels: int) -> list[tuple[int, int, float]]:
    """(bit, bit value marked, sign) of each marked sample, in batch order after the plain sample 0."""
    bits = max(1, (channels - 1).bit_length())
    return [(b, value, sign) for b in range(bits) for value in (1, 0) for sign in (1.0, -1.0)]


def measured_sources(
    model: nn.Module, root: str, targets: list[str], example_input: torch.Tensor, channels: int
) -> dict[str, list[int]]:
    """{target module: for each of its input channels, the root output channel that alone reaches it, or -1}, from
    the first call of each module on one sample."""
    markings = _markings(channels)
    sample = example_input[:1]
    batch = sample.expand(len(markings) + 1, *sample.shape[1:]).contiguous()
    modules = {n: model.get_submodule(n) for n in targets}
    seen: dict[str, torch.Tensor] = {}
    marked = [False]

    def record(name: str):
        def hook(module, args):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
                if len(seen) == len(targets):
                    raise _Seen  # the rest of the forward pass is not needed

        return hook

    def mark(module, args, out):
        if marked[0] or not isinstance(out, torch.Tensor) or out.shape[0] != batch.shape[0]:
            return None
        marked[0] = True
        out = out.clone()
        axis = _channel_axis(module, out)
        scale = 1e3 * (float(out.detach().abs().max()) + 1.0)
        index = torch.arange(channels, device=out.device)
        for i, (bit, value, sign) in enumerate(markings):
            chosen = index[((index >> bit) & 1) == value]
            out.select(0, i + 1).index_add_(
                axis - 1,
                chosen,
                torch.full_like(out.select(0, i + 1).index_select(axis - 1, chosen), sign * scale),
            )
        return out

    hooks = [modules[n].register_forward_pre_hook(record(n)) for n in targets]
    hooks.append(model.get_submodule(root).register_forward_hook(mark))
    try:
        with torch.no_grad():
            model(batch)
    except _Seen:
        pass
    finally:
        for h in hooks:
            h.remove()
    sources = {}
    for name, x in seen.items():
        moved = x.movedim(_channel_axis(modules[name], x), 1)
        moved = moved.flatten(2) if moved.ndim > 2 else moved.unsqueeze(-1)
        changed = (moved[1:] != moved[:1]).any(-1)  # (markings, target channels)
        per_pair = changed.view(-1, 2, 2, changed.shape[-1]).any(2)  # (bits, marked value 1 / 0, channels)
        single = (per_pair[:, 0] ^ per_pair[:, 1]).all(0)
        weights = (1 << torch.arange(per_pair.shape[0], device=x.device)).view(-1, 1)
        index = (per_pair[:, 0].long() * weights).sum(0)
        sources[name] = torch.where(single & (index < channels), index, -1).tolist()
    return sources
