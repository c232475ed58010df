"""What every saliency needs: the analysis samples, the loss, theta_s slices and per-structure reductions."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AnalysisError
from ..progress import ProgressFn, StopFn
from ..pruning.structures import StructureSet, output_axis
from .curvature import CurvatureForm

LOSSES = ("cross-entropy", "squared")
CPU_PASS_BYTES = 32 * 2**20  # glibc's largest block size served from reused heap memory


@dataclass
class ParamSlice:
    """Output-channel rows `channels` of one parameter tensor that go into structures `structure`; `dim` is the
    parameter's axis of output channels."""

    name: str
    param: nn.Parameter
    channels: torch.Tensor
    structure: torch.Tensor
    dim: int = 0

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (shaped like the parameter) as a view with the output channels first."""
        return tensor.movedim(self.dim, 0)

    @property
    def module(self) -> str:
        """The producer module holding the parameter."""
        return self.name.rsplit(".", 1)[0]


def _per_sample(values: torch.Tensor, samples: int) -> torch.Tensor:
    """A module run on (samples x tokens) rows (LeViT's BatchNorm1d) gives per-row values: summed per sample (a
    producer whose output is one for the whole batch is refused before, `StructureSet.shared`)."""
    return values.reshape(samples, -1, values.shape[-1]).sum(1)


@dataclass
class AnalysisInputs:
    """A model in eval mode, its structures, the N' samples and the loss: the inputs of every saliency."""

    model: nn.Module
    structures: StructureSet
    x: torch.Tensor
    y: torch.Tensor
    loss: str = "cross-entropy"
    batch_size: int = 100
    progress: ProgressFn = None
    should_stop: StopFn = None
    slices: list[ParamSlice] = field(default_factory=list)
    curvature: CurvatureForm | None = (
        None  # SOSP-I's form of H_GN, chosen once for all N' (None: for these inputs)
    )
    _indices: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise AnalysisError(f"unknown loss '{self.loss}'; use one of {LOSSES}")
        if self.model.training:
            raise AnalysisError(
                "saliencies are computed in eval mode (samples must be independent): call model.eval()"
            )
        if not self.slices:
            self.slices = structure_slices(self.model, self.structures)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def batches(self):
        """(x, y) batches on the model's device, in order."""
        for start in range(0, self.num_samples, self.batch_size):
            yield (
                self.x[start : start + self.batch_size].to(self.device),
                self.y[start : start + self.batch_size].to(self.device),
            )

    def passes(self, share: float = 1.0):
        """(x, y) on the model's device, each batch split into passes of `share` x `pass_size()` samples (at least
        one): a method that holds more per sample than a forward+backward takes a share, so its peak stays near one
        forward+backward's at the batch."""
        size = max(1, int(self.pass_size() * share))
        for x, y in self.batches():
            yield from zip(x.split(size), y.split(size))

    def pass_size(self) -> int:
        """The batch size, or on a CPU as many samples as keep the widest module output under CPU_PASS_BYTES.

        glibc's malloc gives blocks above 32 MiB fresh pages from the kernel each time, so every such tensor of a
        backward pass page-faults anew (DenseNet-40 SOSP-H at batch 100 took 1.6x as long per sample as at batch 50).
        """
        if self.device.type != "cpu":
            return self.batch_size
        widest = 0

        def measure(module, args, out):
            nonlocal widest
            if isinstance(out, torch.Tensor) and out.ndim:
                widest = max(widest, out.numel() // max(out.shape[0], 1) * out.element_size())

        hooks = [m.register_forward_hook(measure) for m in self.model.modules()]
        try:
            with torch.no_grad():
                self.model(self.x[:1].to(self.device))
        finally:
            for h in hooks:
                h.remove()
        return max(1, min(self.batch_size, CPU_PASS_BYTES // max(widest, 1)))

    def producer_indices(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(module, channels, structures) of every producer piece on the model's device, moved there once: a copy
        to a GPU from host memory waits for the GPU's queued work."""
        device = self.device
        if device not in self._indices:
            self._indices[device] = [
                (p.module, p.channels.to(device), p.structure.to(device)) for p in self.structures.producers
            ]
        return self._indices[device]

    def structure_sums(
        self, per_module: dict[str, torch.Tensor], leading: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """Per-(producer module, channel) values (leading..., C) summed into their structures: (leading..., S), float64.
        A module without rows of theta_s (a norm without affine parameters) has no entry."""
        out = torch.zeros(*leading, self.structures.num_structures, dtype=torch.float64, device=self.device)
        for module, channels, structure in self.producer_indices():
            if module in per_module:
                values = per_module[module]
                if leading and values.shape[0] != leading[0]:
                    values = _per_sample(values, leading[0])
                out.index_add_(len(leading), structure, values[..., channels].to(torch.float64))
        return out

    def params(self) -> list[nn.Parameter]:
        """The distinct parameters holding structure weights, in a fixed order."""
        seen, out = set(), []
        for s in self.slices:
            if id(s.param) not in seen:
                seen.add(id(s.param))
                out.append(s.param)
        return out

    def theta_struc(self) -> list[torch.Tensor]:
        """theta_struc = sum of all theta_s, as one tensor per entry of `params()` (zero outside structures).

        A parameter whose every row belongs to a structure is its own entry, not a copy (a parameter-sized saving).
        """
        rows: dict[int, list[torch.Tensor]] = {}
        dims: dict[int, int] = {}
        for s in self.slices:
            rows.setdefault(id(s.param), []).append(s.channels)
            dims[id(s.param)] = s.dim
        out = []
        for p in self.params():
            covered, dim = torch.unique(torch.cat(rows[id(p)])), dims[id(p)]
            if len(covered) == p.shape[dim]:
                out.append(p.detach())
            else:
                part = torch.zeros_like(p)
                part.movedim(dim, 0)[covered] = p.detach().movedim(dim, 0)[covered]
                out.append(part)
        return out

    def per_structure(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """theta_s . v for every structure s, for v given per entry of `params()`."""
        index = {id(p): i for i, p in enumerate(self.params())}
        out = torch.zeros(self.structures.num_structures, dtype=torch.float64, device=self.device)
        for s in self.slices:
            rows = (
                s.rows(s.param.detach())[s.channels] * s.rows(vectors[index[id(s.param)]])[s.channels]
            ).reshape(len(s.channels), -1)
            out.index_add_(0, s.structure.to(self.device), rows.sum(1).to(torch.float64))
        return out


def structure_slices(model: nn.Module, structures: StructureSet) -> list[ParamSlice]:
    """Every (parameter, channel rows, structures) triple of theta_s: producers' weights and biases."""
    slices = []
    for piece in structures.producers:
        module = model.get_submodule(piece.module)
        for pname in ("weight", "bias"):
            param = getattr(module, pname, None)
            if isinstance(param, nn.Parameter):
                slices.append(
                    ParamSlice(
                        f"{piece.module}.{pname}",
                        param,
                        piece.channels,
                        piece.structure,
                        output_axis(module, pname),
                    )
                )
    return slices


def sample_losses(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss: softmax cross-entropy, or 1/2 ||f - onehot(y)||^2 for the squared loss."""
    if loss == "cross-entropy":
        return F.cross_entropy(logits, y, reduction="none")
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return 0.5 * ((logits - target) ** 2).sum(1)


def _hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    """hardsigmoid from clamp, whose double backward exists (torch has none for aten::hardsigmoid_backward)."""
    return torch.clamp(x / 6 + 0.5, 0.0, 1.0)


def batch_norm_coefficients(m: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm as the affine map x * scale + shift, formed from its weight and bias
    so that their gradients are the same."""
    scale = torch.rsqrt(m.running_var + m.eps)
    shift = -m.running_mean * scale
    if m.weight is not None:
        scale = scale * m.weight
        shift = shift * m.weight
    if m.bias is not None:
        shift = shift + m.bias
    return scale, shift


def per_channel(vector: torch.Tensor, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over `x`, whose channels lie along `dim` (NC... by default)."""
    shape = [1] * x.dim()
    shape[dim] = -1
    return vector.view(shape)


def equal_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor, reference: torch.Tensor) -> bool:
    """Two outputs agree to float rounding, relative to the largest entry of the model's plain output `reference`."""
    tol = 1e-9 if reference.dtype == torch.float64 else 1e-4
    return torch.allclose(
        actual, expected, rtol=tol, atol=tol * float(reference.abs().max().clamp_min(1e-12))
    )


def _affine_batch_norm(m: nn.modules.batchnorm._BatchNorm):
    """Eval-mode BatchNorm as the per-channel affine map it is; its backward and double backward are a multiply."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        scale, shift = batch_norm_coefficients(m)
        return torch.addcmul(per_channel(shift, x), x, per_channel(scale, x))

    return forward


def affine_batch_norm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The eval-mode BatchNorms with running statistics and torch's own forward (timm's BatchNormAct has its own)."""
    plain = nn.modules.batchnorm._BatchNorm.forward
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not m.training
        and type(m).forward is plain
        and m.running_mean is not None
        and "forward" not in vars(m)
    ]


@contextmanager
def patched_forwards(forwards: dict[nn.Module, Callable]) -> Iterator[None]:
    """Each module computes with the forward mapped to it until the block ends; then it has the one it had."""
    previous = {m: vars(m).get("forward") for m in forwards}
    for m, forward in forwards.items():
        m.forward = forward
    try:
        yield
    finally:
        for m, old in previous.items():
            if old is None:
                vars(m).pop("forward", None)
            else:
                m.forward = old


@contextmanager
def affine_batch_norms(model: nn.Module) -> Iterator[nn.Module]:
    """While an analysis runs, every eval-mode BatchNorm with running statistics computes as an affine map."""
    with patched_forwards({m: _affine_batch_norm(m) for m in affine_batch_norm_modules(model)}):
        yield model


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """No parameter requires a gradient while the block runs (activation-only passes), then each flag is restored."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[nn.Module]:
    """Swap ops for equal forms with a cheap (or any) double backward while an HVP runs: eval-mode BatchNorm for its
    affine map, nn.Hardsigmoid for a clamp, and the fused attention kernels for the math one (flash /
    memory-efficient attention have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hardsigmoids = {m: _hardsigmoid for m in model.modules() if isinstance(m, nn.Hardsigmoid)}
    with patched_forwards(hardsigmoids), sdpa_kernel(SDPBackend.MATH), affine_batch_norms(model):
        yield model
