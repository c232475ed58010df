"""How channels flow through each ATen op: one rule per op, looked up by the channel tracer (channel_trace.py).

Every traced tensor carries a label tensor of its shape (float64): at each element, the id of the source channel whose
value it holds (a producer's output channel, an element of a bare parameter), or -1 where it holds none (the input
image, a mask, a value that mixes channels). A rule computes its output's labels from its inputs' and records, through
the `Coupling` it is given, which ids must be removed together (`couple`), which a module reads per channel (`read`),
and which ids no rule can follow (`block`, with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

NONE = -1.0


class Coupling(Protocol):
    """What a rule may record while it runs (implemented by channel_trace.Tracer)."""

    def couple(self, labels: Sequence[torch.Tensor]) -> None:
        """The ids at equal positions of the given (same-shaped) label tensors go together."""

    def couple_within(self, labels: torch.Tensor, dim: int) -> None:
        """Every id in one slice of `labels` along `dim` goes with every other id in that slice."""

    def block(self, labels: torch.Tensor, why: str) -> None:
        """The ids in `labels` cannot be pruned, for the reason given."""

    def heads(self, ids: torch.Tensor) -> None:
        """One id per batch slice that an attention keeps whole (its heads), for the surgery to count them."""


@dataclass
class OpCall:
    """One traced call as a rule sees it: the op, its arguments with labels in place of tensors (positional as
    called, and by name), the real output, and where it ran ("op in module") for reasons."""

    op: Callable
    args: tuple
    kwargs: dict
    named: dict
    out: object
    where: str

    def value(self, name: str, position: int, default: object = None) -> object:
        """An argument by its name, else by its position in the call."""
        if name in self.named:
            return self.named[name]
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if len(self.args) > position else default

    def tensors(self) -> list[torch.Tensor]:
        """The labelled tensor arguments, lists flattened."""
        found = []
        for a in list(self.args) + list(self.kwargs.values()):
            for item in a if isinstance(a, (list, tuple)) else [a]:
                if is_labelled(item):
                    found.append(item)
        return found


Rule = Callable[[Coupling, OpCall], object]  # -> the output's labels: a tensor, a tuple of them, or None


def is_labelled(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float64 and bool((value >= 0).any())


def _moved(coupling: Coupling, call: OpCall) -> object:
    """Pure data movement (view, permute, cat, slice, roll, pixel shuffle, index, ...): the op applied to labels
    (laid out contiguously: a label tensor's strides need not match the traced value's)."""
    args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in call.args]
    return call.op(*args, **call.kwargs)


def _chunked(coupling: Coupling, call: OpCall) -> object:
    """chunk(x, n, dim): the chunks stay equal only where each loses the same positions, so channels at one position
    of every chunk go together (as the groups of a grouped conv)."""
    pieces = _moved(coupling, call)
    sizes = {p.shape[call.value("dim", 2, 0)] for p in pieces}
    if len(pieces) > 1 and len(sizes) == 1:
        coupling.couple(list(pieces))
    return pieces


def _padded(coupling: Coupling, call: OpCall) -> object:
    """A constant pad adds positions that hold no channel; reflect / replicate pads move values."""
    if call.value("mode", 2, "constant") != "constant":
        return call.op(*call.args, **call.kwargs)
    return torch.nn.functional.pad(call.value("input", 0), list(call.value("pad", 1)), value=NONE)


def _first_unchanged(coupling: Coupling, call: OpCall) -> object:
    """Ops that keep their input's values in place (dtype casts, detach, dropout, softmax along a dim)."""
    first = call.args[0] if call.args else call.value("input", 0)
    if isinstance(first, torch.Tensor) and isinstance(call.out, torch.Tensor):
        return first.expand(call.out.shape).contiguous()
    return None


def varies(labels: torch.Tensor, dim: int) -> bool:
    """Whether the labelled ids change along `dim`."""
    if labels.shape[dim] <= 1:
        return False
    first = labels.narrow(dim, 0, 1)
    return bool(((labels != first) & ((labels >= 0) | (first >= 0))).any())


def broadcast_labels(
    coupling: Coupling, inputs: Sequence[torch.Tensor], shape: torch.Size
) -> torch.Tensor | None:
    """Inputs meeting at one position of an elementwise op go together, except an input broadcast along an axis where
    another input's channels vary: a gate of one channel over the stream couples nothing and passes no id on."""
    aligned = [v.reshape((1,) * (len(shape) - v.ndim) + tuple(v.shape)) for v in inputs]
    grown = [v.expand(shape) for v in aligned]
    partners = []
    for i, value in enumerate(aligned):
        broadcast = [d for d in range(len(shape)) if value.shape[d] == 1 and shape[d] > 1]
        if not any(varies(other, d) for j, other in enumerate(grown) if j != i for d in broadcast):
            partners.append(grown[i])
    if not partners:
        return None
    if len(partners) > 1:
        coupling.couple(partners)
    result = partners[0].clone()
    for other in partners[1:]:
        result = torch.where(result >= 0, result, other)
    return result


def _elementwise(coupling: Coupling, call: OpCall) -> object:
    """Elementwise ops with broadcasting (add, mul, activations, where, ...)."""
    inputs = call.tensors()
    if not inputs or not isinstance(call.out, torch.Tensor):
        return None
    return broadcast_labels(coupling, inputs, call.out.shape)


def _glu(coupling: Coupling, call: OpCall) -> object:
    """glu(x, dim): the two halves meet elementwise (a * sigmoid(b)), so channel j goes with channel j + C."""
    a, b = call.value("input", 0).chunk(2, dim=call.value("dim", 1, -1))
    return broadcast_labels(coupling, [a, b], a.shape)


def reduced(labels: torch.Tensor, dims: Sequence[int], keepdim: bool) -> torch.Tensor:
    """Labels of a reduction over `dims` (all where empty): the id where one id fills the reduced positions, else
    -1 (the channels are consumed: removing one shortens the reduction, the output keeps its shape)."""
    dims = [d % labels.ndim for d in dims] if dims else list(range(labels.ndim))
    if not dims:
        return labels.clone()
    high = labels.amax(dim=dims, keepdim=keepdim)
    low = torch.where(labels >= 0, labels, torch.inf).amin(dim=dims, keepdim=keepdim)
    return torch.where((high >= 0) & (low == high), high, torch.full_like(high, NONE))


def _reduction(coupling: Coupling, call: OpCall) -> object:
    """sum / mean / amax / var ... over explicit dims (all when none are given). Where the channels vary along a kept
    axis too (a sum over stacked paths), the reduced slices meet position by position and go together, as in an add."""
    labels = call.args[0]
    dims = call.named.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or range(labels.ndim))
    dims = [d % labels.ndim for d in dims]
    kept = [d for d in range(labels.ndim) if d not in dims]
    if dims and kept and any(varies(labels, d) for d in kept):
        across = labels.permute(kept + dims).reshape(
            -1, int(torch.tensor([labels.shape[d] for d in dims]).prod())
        )
        coupling.couple_within(across, 0)
        result = across.amax(1)  # kept axes in their order: reshaped to the output's shape below
    else:
        result = reduced(labels, dims, bool(call.named.get("keepdim", False)))
    values = call.out[0] if isinstance(call.out, (tuple, list)) else call.out
    result = result.reshape(values.shape)
    if isinstance(call.out, (tuple, list)):  # max.dim / var_mean: the first output is the reduced value
        return (result,) + tuple(result.clone() if o.shape == result.shape else None for o in call.out[1:])
    return result


def _spatial_window(coupling: Coupling, call: OpCall) -> object:
    """Pools and interpolations over the positions of (N, C, ...) tensors: a channel's positions stay its own; where
    one channel's positions hold several ids (after a pixel shuffle) a window would mix them: blocked."""
    value = call.args[0]
    spatial = list(range(2, value.ndim))
    if any(varies(value, d) for d in spatial):
        coupling.block(value, f"{call.where} pools positions that hold different channels")
        return None
    per_channel = value
    for d in spatial:
        per_channel = per_channel.narrow(d, 0, 1)
    values = call.out[0] if isinstance(call.out, (tuple, list)) else call.out
    result = per_channel.expand(values.shape).clone()
    return (result, None) if isinstance(call.out, (tuple, list)) else result


def _batched_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (..., n, k) and b (..., k, m) with 1-d operands made 2-d and the batch dims broadcast."""
    a = a.unsqueeze(0) if a.ndim == 1 else a
    b = b.unsqueeze(-1) if b.ndim == 1 else b
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.expand(batch + a.shape[-2:]), b.expand(batch + b.shape[-2:])


def matmul_labels(coupling: Coupling, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b. Where channels vary along a batch axis (heads: (B, h, N, d)), each batch slice of both operands goes
    together (heads stay whole, so every head keeps its width); otherwise the contracted axis pairs a's column k
    with b's row k (q with k per channel), and the output holds a's row ids and b's column ids where those are
    constant along k."""
    a, b = _batched_operands(a, b)
    shape = a.shape[:-1] + b.shape[-1:]
    if any(varies(t, d) for t in (a, b) for d in range(a.ndim - 2)):
        both = torch.cat(
            [a.reshape(-1, a.shape[-2] * a.shape[-1]), b.reshape(-1, b.shape[-2] * b.shape[-1])], 1
        )
        coupling.couple_within(both, 0)
        head = both.amax(1)
        coupling.heads(head)
        return head.reshape(a.shape[:-2] + (1, 1)).expand(shape).clone()
    columns = torch.cat([a, b.transpose(-1, -2)], -2)  # (..., n + m, k): one contracted index per column
    coupling.couple_within(columns.movedim(-1, 0).reshape(columns.shape[-1], -1), 0)
    rows = reduced(a, [-1], keepdim=True).expand(shape)
    cols = reduced(b, [-2], keepdim=True).expand(shape)
    return broadcast_labels(coupling, [rows, cols], shape)


def _matmul(coupling: Coupling, call: OpCall) -> object:
    a, b = call.args[0], call.args[1]
    return matmul_labels(coupling, a, b).reshape(call.out.shape)


def _attention(coupling: Coupling, call: OpCall) -> object:
    """scaled_dot_product_attention(q, k, v, attn_mask): softmax(q k^T + mask) v, read as two matmuls."""
    q, k, v = call.args[:3]
    scores = matmul_labels(coupling, q, k.transpose(-1, -2))
    mask = call.value("attn_mask", 3)
    if is_labelled(mask):
        scores = broadcast_labels(coupling, [scores, mask], scores.shape)
    return matmul_labels(coupling, scores, v).reshape(call.out.shape)


def _einsum(coupling: Coupling, call: OpCall) -> object:
    """einsum of two operands, read as a batched matmul: letters in both operands and the output are batch axes,
    letters in both but not the output are contracted, the rest are each operand's own (rows / columns)."""
    equation, operands = call.args[0], call.args[1]
    inputs, output = equation.replace(" ", "").split("->")
    left, right = inputs.split(",")
    if len(operands) != 2 or len(set(left)) != len(left) or len(set(right)) != len(right):
        raise ValueError("the engine reads einsum of two operands without repeated letters")
    batch = [c for c in left if c in right and c in output]
    contracted = [c for c in left if c in right and c not in output]
    rows = [c for c in left if c not in right]
    cols = [c for c in right if c not in left]
    if any(c not in output for c in rows + cols):
        raise ValueError("the engine reads einsum whose every unshared letter is kept")
    a, b = operands
    a = a.permute([left.index(c) for c in batch + rows + contracted])
    b = b.permute([right.index(c) for c in batch + contracted + cols])
    sizes = {c: n for c, n in zip(left, operands[0].shape)} | {c: n for c, n in zip(right, operands[1].shape)}
    flat = [sizes[c] for c in batch]
    size = lambda letters: int(torch.tensor([sizes[c] for c in letters]).prod())  # noqa: E731
    a = a.reshape(flat + [size(rows), size(contracted)])
    b = b.reshape(flat + [size(contracted), size(cols)])
    result = matmul_labels(coupling, a, b).reshape([sizes[c] for c in batch + rows + cols])
    order = batch + rows + cols
    return result.permute([order.index(c) for c in output]).contiguous()


def _creation(coupling: Coupling, call: OpCall) -> object:
    """New tensors and comparisons (zeros_like, arange, eq, argmax ...): they hold no channel."""
    return None


MOVEMENT = (
    "view reshape _unsafe_view permute transpose t clone alias flatten unflatten squeeze unsqueeze expand "
    "expand_as slice select narrow split split_with_sizes chunk unbind tensor_split cat concat concatenate stack "
    "flip roll pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle index index_select gather "
    "repeat tile movedim swapaxes view_as reshape_as lift_fresh_copy detach im2col col2im upsample_nearest1d "
    "upsample_nearest2d upsample_nearest3d _upsample_nearest_exact2d repeat_interleave masked_select take diagonal "
    "unfold"
).split()
ELEMENTWISE = (
    "add sub mul div rsub relu gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu selu celu mish "
    "softplus exp log log1p sqrt rsqrt pow neg abs clamp clamp_min clamp_max erf where masked_fill maximum minimum "
    "square reciprocal sign addcmul addcdiv lerp mul_ sin cos floor round true_divide"
).split()
UNCHANGED = "dropout feature_dropout alpha_dropout _to_copy to type_as softmax log_softmax _softmax contiguous".split()
REDUCTIONS = (
    "sum mean amax amin max min var std var_mean std_mean logsumexp prod norm linalg_vector_norm".split()
)
WINDOWS = (
    "avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d max_pool2d_with_indices adaptive_avg_pool1d "
    "adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d upsample_bilinear2d "
    "upsample_bicubic2d upsample_linear1d upsample_trilinear3d lp_pool2d"
).split()
CREATION = (
    "zeros_like ones_like full_like empty_like rand_like randn_like new_zeros new_ones new_full new_empty arange "
    "zeros ones full empty eq ne gt lt ge le logical_not logical_and logical_or argmax argmin scalar_tensor "
    "sym_size sym_numel fill_ zero_"
).split()

RULES: dict[str, Rule] = {
    **{name: _moved for name in MOVEMENT},
    **{name: _elementwise for name in ELEMENTWISE},
    **{name: _first_unchanged for name in UNCHANGED},
    **{name: _reduction for name in REDUCTIONS},
    **{name: _spatial_window for name in WINDOWS},
    **{name: _creation for name in CREATION},
    "glu": _glu,
    "chunk": _chunked,
    "pad": _padded,
    "constant_pad_nd": _padded,
    "matmul": _matmul,
    "bmm": _matmul,
    "mm": _matmul,
    "scaled_dot_product_attention": _attention,
    "einsum": _einsum,
}


def rule_of(op_name: str) -> Rule | None:
    """The rule for an ATen op name ('add_' and 'add' share one), or None where the engine has none."""
    return RULES.get(op_name) or RULES.get(op_name.rstrip("_"))
