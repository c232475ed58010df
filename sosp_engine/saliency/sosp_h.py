"""SOSP-H: lamH(s) = |theta_s . g| + 1/2 |theta_s . (H theta_struc)| with the exact Hessian (one HVP over N' samples).

Where every producer is homogeneous in its own channel rows (plain conv, linear and affine norm layers, checked),
scaling theta_s by alpha_s scales the producer's output channels by alpha_s. Then d L / d alpha_s = theta_s . g and
d^2 L / d alpha_s d alpha_t = theta_s . H theta_t, so both terms are the gradient and the Hessian-vector product
(direction all ones) in the S-dimensional alpha space: no parameter gradient, no weight-gradient convolution.
Other models take the HVP in parameter space.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.structures import channel_dim
from ..devices import full_float32
from ..progress import check_cancel, report
from .common import (
    AnalysisInputs,
    affine_batch_norm_modules,
    batch_norm_coefficients,
    frozen_parameters,
    patched_forwards,
    per_channel,
    sample_losses,
    twice_differentiable,
)
from .homogeneity import capture_point, not_scaling
from .pairing import sole_norm_consumers

# The double backward holds about twice a forward+backward's tensors per sample: passes of half the batch keep its
# peak near one forward+backward's at the batch (ResNet-56, N' = 200, batch 100: 1.61x at the whole batch, 1.05x).
HVP_PASS_SHARE = 0.5


def gradient_and_hvp(
    inputs: AnalysisInputs, vector: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The mean-loss gradient and the Hessian-vector product H @ vector, by double backward, batch by batch."""
    params = inputs.params()
    grads: list[torch.Tensor] = []
    hvp: list[torch.Tensor] = []
    n, done = inputs.num_samples, 0
    for x, y in inputs.passes(HVP_PASS_SHARE):
        check_cancel(inputs.should_stop)
        with twice_differentiable(inputs.model) as model:
            loss = sample_losses(model(x), y, inputs.loss).sum() / n
        g = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, vector))
        hv = torch.autograd.grad(dot, params)
        if not grads:  # the first batch's results are the sums so far: no parameter-sized zero accumulators
            grads, hvp = [gi.detach() for gi in g], list(hv)
        else:
            for acc, gi in zip(grads, g):
                acc += gi.detach()
            for acc, hi in zip(hvp, hv):
                acc += hi
        del g, dot, hv
        done += len(y)
        report(inputs.progress, done / n, "Hessian-vector product")
    return grads, hvp


def scalable_producers(inputs: AnalysisInputs) -> dict[str, torch.Tensor] | None:
    """{producer module: its channel rows in structures} when every producer's output scales with its rows (checked,
    see homogeneity.py) and no other module holds its weight or bias; else None."""
    rows: dict[str, list[torch.Tensor]] = {}
    for s in inputs.slices:
        rows.setdefault(s.module, []).append(s.channels)
    holders: dict[int, int] = {}
    for m in inputs.model.modules():
        for p in m.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    if any(holders.get(id(s.param), 0) > 1 for s in inputs.slices) or not_scaling(inputs):
        return None
    return {name: torch.unique(torch.cat(r)) for name, r in rows.items()}


class _FixedWeightConv(torch.autograd.Function):
    """A convolution whose weight needs no gradient, with the input gradient as a transposed convolution.

    torch's own convolution double backward forms the weight-gradient convolution even when no weight needs it; the
    transposed convolution's backward forms only the input term, one convolution fewer per layer in an HVP.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.modules.conv._ConvNd) -> torch.Tensor:
        ctx.module, ctx.input_shape = module, x.shape
        return module._conv_forward(x, module.weight, module.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        m = ctx.module
        spatial = len(m.kernel_size)
        extra = [
            size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, out, s, p, d, k in zip(
                ctx.input_shape[-spatial:],
                grad.shape[-spatial:],
                m.stride,
                m.padding,
                m.dilation,
                m.kernel_size,
            )
        ]
        transposed = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
        return transposed(grad, m.weight, None, m.stride, m.padding, extra, m.groups, m.dilation), None


def _transposable(m: nn.Module) -> bool:
    """A plain convolution with numeric zero padding (its input gradient is one transposed convolution)."""
    return (
        type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        and "forward" not in vars(m)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


@contextmanager
def fixed_weight_convolutions(model: nn.Module) -> Iterator[nn.Module]:
    """While parameters are frozen, plain convolutions backpropagate with a transposed convolution (see above)."""
    with patched_forwards(
        {m: (lambda x, m=m: _FixedWeightConv.apply(x, m)) for m in model.modules() if _transposable(m)}
    ):
        yield model


@contextmanager
def _scaled_outputs(
    model: nn.Module, names: list[str], affine: set[int], fused: dict[str, str]
) -> Iterator[dict[str, torch.Tensor]]:
    """Multiply each named module's output channels by a fresh all-ones alpha (created at its first call).

    An eval-mode BatchNorm (its id in `affine`) takes alpha into its affine coefficients (no extra full-size
    multiply), and so does the producer before it where `fused` pairs them; other modules scale their output in a
    forward hook.
    """
    scales: dict[str, torch.Tensor] = {}

    def alpha_for(name: str, like: torch.Tensor, size: int) -> torch.Tensor:
        if name not in scales:
            scales[name] = torch.ones(size, dtype=like.dtype, device=like.device, requires_grad=True)
        return scales[name]

    def scale_output(module, args, out, name):
        dim = channel_dim(module, out)
        return out * per_channel(alpha_for(name, out, out.shape[dim]), out, dim)

    def scaled_batch_norm(m, own: str | None, before: str | None):
        def forward(x: torch.Tensor) -> torch.Tensor:
            scale, shift = batch_norm_coefficients(m)
            if own is not None:
                alpha = alpha_for(own, x, scale.numel())
                scale, shift = scale * alpha, shift * alpha
            if before is not None:  # the producer's output scaled by its alpha, then normalised
                scale = scale * alpha_for(before, x, scale.numel())
            # not addcmul: its backward multiplies the whole input by the scalar `value` again for the scale's gradient
            return x * per_channel(scale, x) + per_channel(shift, x)

        return forward

    norms = {n for n in names if id(model.get_submodule(n)) in affine} | set(fused)
    folded = {
        model.get_submodule(n): scaled_batch_norm(
            model.get_submodule(n), n if n in names else None, fused.get(n)
        )
        for n in norms
    }
    hooked = [n for n in names if n not in norms and n not in fused.values()]
    hooks = [
        capture_point(model.get_submodule(n)).register_forward_hook(
            lambda point, a, o, m=model.get_submodule(n), n=n: scale_output(m, a, o, n)
        )
        for n in hooked
    ]
    try:
        with patched_forwards(folded):
            yield scales
    finally:
        for h in hooks:
            h.remove()


def channel_scale_terms(
    inputs: AnalysisInputs, rows: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(theta_s . g, theta_s . H theta_struc) per structure as d L / d alpha and (d^2 L / d alpha^2) 1, batch by batch.

    None when a producer module is never called (its parameters are used some other way).
    """
    names = list(rows)
    rows = {k: r.to(inputs.device) for k, r in rows.items()}
    affine = {id(m) for m in affine_batch_norm_modules(inputs.model)}
    fused = sole_norm_consumers(inputs, names, affine)
    grads: dict[str, torch.Tensor] = {}
    hvp: dict[str, torch.Tensor] = {}
    n, done = inputs.num_samples, 0
    for x, y in inputs.passes(HVP_PASS_SHARE):
        check_cancel(inputs.should_stop)
        with (
            frozen_parameters(inputs.model),
            twice_differentiable(inputs.model) as model,
            fixed_weight_convolutions(model),
            _scaled_outputs(model, names, affine, fused) as scales,
        ):
            loss = sample_losses(model(x), y, inputs.loss).sum() / n
        if len(scales) < len(names):
            return None
        alphas = [scales[k] for k in names]
        g = torch.autograd.grad(loss, alphas, create_graph=True, allow_unused=True, materialize_grads=True)
        dot = sum(gi[rows[k]].sum() for k, gi in zip(names, g))
        hv = (
            torch.autograd.grad(dot, alphas, allow_unused=True, materialize_grads=True)
            if dot.requires_grad
            else [torch.zeros_like(a) for a in alphas]
        )
        for k, gi, hi in zip(names, g, hv):
            grads[k] = grads[k] + gi.detach() if k in grads else gi.detach()
            hvp[k] = hvp[k] + hi if k in hvp else hi
        del g, dot, hv, loss
        done += len(y)
        report(inputs.progress, done / n, "Hessian-vector product")
    return inputs.structure_sums(grads), inputs.structure_sums(hvp)


@full_float32()
def sosp_h_terms(inputs: AnalysisInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam1(s), theta_s . H theta_struc) for every structure, both signed."""
    rows = scalable_producers(inputs)
    terms = channel_scale_terms(inputs, rows) if rows is not None else None
    if terms is not None:
        return terms
    grads, hvp = gradient_and_hvp(inputs, inputs.theta_struc())
    return inputs.per_structure(grads), inputs.per_structure(hvp)


def sosp_h_saliency(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """lamH(s) = |lam1(s)| + 1/2 |theta_s . H theta_struc| (paper eq. 7)."""
    return first.abs() + 0.5 * second.abs()
