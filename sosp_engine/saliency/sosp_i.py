"""SOSP-I: the Gauss-Newton matrix Q of eq. (3) from gradient x activation (Euler's theorem) and one Gram product."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.structures import channel_dim
from ..devices import available_memory, full_float32
from ..errors import AnalysisError
from .memory import MATRIX, memory_phase
from ..progress import check_cancel, report
from .common import (
    AnalysisInputs,
    affine_batch_norm_modules,
    affine_batch_norms,
    batch_norm_coefficients,
    frozen_parameters,
    patched_forwards,
    per_channel,
)
from .homogeneity import capture_point, not_scaling, producer_modules
from .pairing import NormReaders, norm_read_structures, sole_norm_consumers

GRAM_BLOCK_BYTES = 256 * 2**20  # the float64 block of columns added to the S x S matrix at a time


FOLDABLE_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class CapturePlan:
    """How SOSP-I reads the producers' outputs in each forward."""

    copied: set[str]  # producers whose output a later op changes in place: the model goes on with a copy
    folded: dict[
        str, str
    ]  # {norm: producer}: the pair runs as one producer, the norm's scale and shift folded in
    read_by_norms: NormReaders = field(
        default_factory=NormReaders
    )  # norms whose terms come from their producers'

    @cached_property
    def norm_of(self) -> dict[str, str]:
        """{producer: the norm folded into it}."""
        return {producer: norm for norm, producer in self.folded.items()}


def capture_plan(inputs: AnalysisInputs) -> CapturePlan:
    """Found on one sample: the conv -> BatchNorm pairs to fold, the norms read through their producers, and the
    outputs that need a copy."""
    names = producer_modules(inputs)
    affine = {id(m) for m in affine_batch_norm_modules(inputs.model)}
    folded = {
        norm: producer
        for norm, producer in sole_norm_consumers(inputs, names, affine).items()
        if norm in names
        and type(inputs.model.get_submodule(producer)) in FOLDABLE_PRODUCERS
        and "forward" not in vars(inputs.model.get_submodule(producer))
    }
    read_by_norms = norm_read_structures(inputs, names, affine, set(folded) | set(folded.values()))
    seen: dict[str, list[tuple[torch.Tensor, int]]] = {}

    def record(module, args, out, name):
        if isinstance(out, torch.Tensor):
            seen.setdefault(name, []).append((out, out._version))

    hooks = [
        capture_point(inputs.model.get_submodule(n)).register_forward_hook(
            lambda m, a, out, n=n: record(m, a, out, n)
        )
        for n in names
        if n not in folded
    ]
    try:
        with torch.no_grad(), analysis_forwards(inputs.model, folded):
            inputs.model(inputs.x[:1].to(inputs.device))
    finally:
        for h in hooks:
            h.remove()
    return CapturePlan(
        {n for n, outs in seen.items() if any(t._version != v for t, v in outs)}, folded, read_by_norms
    )


def _passed_on(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def analysis_forwards(model: nn.Module, folded: dict[str, str]) -> Iterator[nn.Module]:
    """Eval-mode BatchNorms as affine maps, and each folded pair (`{norm: producer}`) as one producer with the norm's
    scale and shift in its weight and bias; the norm passes its input on. One op fewer forward and backward."""
    forwards = {}
    for norm_name, producer_name in folded.items():
        norm, producer = model.get_submodule(norm_name), model.get_submodule(producer_name)
        with torch.no_grad():
            scale, shift = batch_norm_coefficients(norm)
            weight = producer.weight * per_channel(scale, producer.weight, 0)
            bias = shift if producer.bias is None else producer.bias * scale + shift
        if isinstance(producer, nn.Linear):
            forwards[producer] = lambda x, w=weight, b=bias: F.linear(x, w, b)
        else:
            forwards[producer] = lambda x, m=producer, w=weight, b=bias: m._conv_forward(x, w, b)
        forwards[norm] = _passed_on
    with affine_batch_norms(model), patched_forwards(forwards):
        yield model


class _GradientOnly:
    """The outputs whose products need only their gradient (norms read through their producers): hooked as they are
    formed and not kept, so a later in-place op needs no copy. `reduce(g, name, None)` takes each gradient."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.reduce = None

    def watch(self, name: str, out: torch.Tensor) -> None:
        self.names.append(name)
        out.register_hook(lambda g: self.reduce(g, name, None))


@contextmanager
def _captured_outputs(
    inputs: AnalysisInputs, plan: CapturePlan
) -> Iterator[tuple[dict, list, _GradientOnly]]:
    """Record every producer's output at its capture point, and each uncopied record's version to check afterwards.

    Where a later op changes an output in place (`plan.copied`), the model goes on with a copy so the record stays
    the output; everywhere else the output itself is recorded. A folded norm is read through its producer, and a norm
    read through its producers only by its gradient.
    """
    store: dict[str, list[torch.Tensor]] = {}
    versions: list[tuple[str, torch.Tensor, int]] = []
    gradient_only = _GradientOnly()
    hooks = []
    for name in producer_modules(inputs):
        if name in plan.folded:
            continue

        def hook(module, args, out, name=name):
            if name in plan.read_by_norms.norms and out.grad_fn is not None:
                gradient_only.watch(name, out)
                return None
            if not out.requires_grad:  # the first producer: start the graph here, the input needs no gradient
                out.requires_grad_(True)
            store.setdefault(name, []).append(out)
            if name in plan.copied:
                return out.clone()
            versions.append((name, out, out._version))
            return None

        hooks.append(capture_point(inputs.model.get_submodule(name)).register_forward_hook(hook))
    try:
        with frozen_parameters(inputs.model):
            yield store, versions, gradient_only
    finally:
        for h in hooks:
            h.remove()


def check_euler(inputs: AnalysisInputs) -> None:
    """Gradient x output is phi theta_s only for producers that scale with their rows: refuse the others by name."""
    failing = not_scaling(inputs)
    if failing:
        raise AnalysisError(
            f"SOSP-I reads phi theta_s as gradient x output (Euler's theorem), which needs each producer's output "
            f"channel to scale with its own weight and bias; {len(failing)} do not (e.g. {failing[:3]}: weight "
            "standardisation, an activation inside the module or a hook). Use SOSP-H (method sosp-h), which is exact "
            "for any layer."
        )


def _add_products(
    inputs: AnalysisInputs,
    plan: CapturePlan,
    shifts: dict[str, torch.Tensor],
    name: str,
    tensor: torch.Tensor | None,
    g: torch.Tensor,
    per_module: dict[str, torch.Tensor],
) -> None:
    """Add one output's gradient x output, summed over positions per channel, to its module's (n, C) products.

    A producer with its norm folded in gives y = scale * u + shift (`shifts[producer]`): the norm's term is sum g y,
    the producer's scale * sum g u = sum g y - shift * sum g. A norm read through its producers
    (`plan.read_by_norms`) adds only shift * sum g (`shifts[norm]`, no output needed); its producers' terms count
    twice, once for the norms' scales."""

    def add(key: str, contrib: torch.Tensor) -> None:
        per_module[key] = per_module[key] + contrib if key in per_module else contrib

    n, module = g.shape[0], inputs.model.get_submodule(name)
    dim = channel_dim(module, g)
    if dim != 1:
        g = g.movedim(dim, 1)
    g = g.reshape(n, g.shape[1], -1)
    if name in plan.read_by_norms.norms:
        add(name, g.sum(2) * shifts[name])
        return
    tensor = tensor.detach()  # the products must not keep the forward graph alive
    if dim != 1:
        tensor = tensor.movedim(dim, 1)
    products = torch.linalg.vecdot(g, tensor.reshape(n, tensor.shape[1], -1))
    doubled = plan.read_by_norms.doubled.get(name)
    if doubled is not None:
        products[:, doubled] *= 2
    norm = plan.norm_of.get(name)
    if norm is None:
        add(name, products)
        return
    add(norm, products)
    add(name, products - g.sum(2) * shifts[name])


def output_direction_products(
    inputs: AnalysisInputs,
    x: torch.Tensor,
    directions,
    plan: CapturePlan | None = None,
    products: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, D), P (n, K, S)) with P[n, k, s] = u_nk^T phi(x_n) theta_s for K per-sample output directions u_nk.

    `directions(logits)` returns the (n, K, D) directions; each costs one activation-only backward pass. Without
    `products` the passes run alone and P is empty (the cost floor).
    """
    plan = plan if plan is not None else capture_plan(inputs)
    while True:
        with (
            _captured_outputs(inputs, plan) as (store, versions, gradient_only),
            analysis_forwards(inputs.model, plan.folded),
        ):
            logits = inputs.model(x.detach())
            silent = [
                n
                for n in producer_modules(inputs)
                if n not in store and n not in plan.folded and n not in gradient_only.names
            ]
            if silent:
                raise AnalysisError(
                    f"SOSP-I reads each producer's output, but {silent[:3]} never ran as a module "
                    "(its parameters are used another way); use SOSP-H (method sosp-h), which is exact "
                    "for it"
                )
            altered = {name for name, tensor, version in versions if tensor._version != version}
            if not altered:
                return logits.detach(), _direction_products(
                    inputs, store, gradient_only, plan, logits, directions, products
                )
        plan.copied |= (
            altered  # changed in place although the one-sample probe saw no such op: again, with copies
        )


def _direction_products(
    inputs: AnalysisInputs,
    store: dict[str, list[torch.Tensor]],
    gradient_only: _GradientOnly,
    plan: CapturePlan,
    logits: torch.Tensor,
    directions,
    products: bool = True,
) -> torch.Tensor:
    """(n, K, S): one activation-only backward pass per direction (empty without `products`).

    Each output's gradient is reduced to its products by a hook the moment the pass forms it, so no pass holds every
    producer's gradient at once. The pass runs back to the outputs that start the graph and reaches every other.
    """
    targets = [(name, t) for name, ts in store.items() for t in ts]
    starts = [t for ts in store.values() for t in ts if t.grad_fn is None]
    u = directions(logits.detach()).to(logits.dtype)
    k_count = u.shape[1]
    shifts = {
        producer: batch_norm_coefficients(inputs.model.get_submodule(norm))[1]
        for producer, norm in plan.norm_of.items()
    }
    shifts.update(
        {
            norm: batch_norm_coefficients(inputs.model.get_submodule(norm))[1]
            for norm in plan.read_by_norms.norms
        }
    )
    per_module: dict[str, torch.Tensor] = {}
    reduced: list[str] = []

    def reduce(g: torch.Tensor, name: str, tensor: torch.Tensor) -> None:
        if products:
            _add_products(inputs, plan, shifts, name, tensor, g, per_module)
        reduced.append(name)

    hooks = [t.register_hook(lambda g, name=name, t=t: reduce(g, name, t)) for name, t in targets]
    gradient_only.reduce = reduce
    expected = Counter(name for name, _ in targets) + Counter(gradient_only.names)
    columns = []
    try:
        for k in range(k_count):
            check_cancel(inputs.should_stop)
            per_module.clear()
            reduced.clear()
            torch.autograd.grad(logits, starts, grad_outputs=u[:, k], retain_graph=k < k_count - 1)
            if len(reduced) != expected.total():  # a product left out would be a silent zero in Q
                missing = sorted(expected - Counter(reduced))
                raise AnalysisError(
                    f"SOSP-I saw no gradient at the outputs of {missing[:3]} in the backward pass "
                    "(an op outside autograd?); use SOSP-H (method sosp-h)"
                )
            if products:
                columns.append(inputs.structure_sums(per_module, (logits.shape[0],)))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(columns, dim=1) if columns else torch.empty(0)


def jacobian_structure_products(
    inputs: AnalysisInputs, x: torch.Tensor, plan: CapturePlan | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, D), A (n, D, S)) with A[n, d, s] = (phi(x_n) theta_s)_d, from one forward and D
    activation-only backwards."""

    def unit_vectors(logits: torch.Tensor) -> torch.Tensor:
        n, d = logits.shape
        return torch.eye(d, dtype=logits.dtype, device=logits.device).expand(n, d, d)

    return output_direction_products(inputs, x, unit_vectors, plan)


def label_difference_directions(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, D-1, D): e_d - e_y for every d != y_n. They span the range of R_n = diag(p) - p p^T (R_n 1 = 0)."""
    n, d = logits.shape
    eye = torch.eye(d, dtype=logits.dtype, device=logits.device)
    others = (
        torch.arange(d, device=logits.device)
        .expand(n, d)[torch.arange(d, device=logits.device).expand(n, d) != y.unsqueeze(1)]
        .view(n, d - 1)
    )
    return eye[others] - eye[y].unsqueeze(1)


def cross_entropy_curvature_rows(
    g: torch.Tensor, q: torch.Tensor, p_label: torch.Tensor, gradient_products: torch.Tensor
) -> torch.Tensor:
    """(n, D-1, S) rows r with r^T r = g^T (diag(q) - q q^T) g, sample by sample: the Gauss-Newton matrix of
    cross-entropy as one Gram product, D - 1 rows per sample.

    g: products with the directions e_d - e_y, q: p without its label entry, p_label: (n, 1) p_y, gradient_products:
    q^T g. With u = sqrt(q), |u|^2 = 1 - p_y: I - u u^T = (I - c u u^T)^2 for c = 1 / (1 + sqrt(p_y)), so
    r = diag(u) (g - c q^T g). Nothing is subtracted after squaring, so no precision is lost to cancellation.
    """
    c = 1.0 / (1.0 + p_label.sqrt())
    return q.sqrt().unsqueeze(2) * (g - (c * gradient_products).unsqueeze(1))


def drop_label_column(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p without the entry of each sample's label: (n, D-1), in the order of `label_difference_directions`."""
    n, d = p.shape
    keep = torch.arange(d, device=p.device).expand(n, d) != y.unsqueeze(1)
    return p[keep].view(n, d - 1)


def sampled_label_directions(
    logits: torch.Tensor, y: torch.Tensor, labels_per_sample: int, generator: torch.Generator
) -> torch.Tensor:
    """(n, k+1, D): p - e_y' for k labels y' ~ softmax (an unbiased Fisher = GN estimate), then p - e_y for lam1."""
    p = torch.softmax(logits.double(), 1)
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    sampled = torch.multinomial(p.cpu(), labels_per_sample, replacement=True, generator=generator).to(
        p.device
    )
    return torch.cat([p.unsqueeze(1) - eye[sampled], (p - eye[y]).unsqueeze(1)], dim=1)


def loss_output_gradient(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """d loss_n / d f_n per sample: p - onehot(y) for cross-entropy, f - onehot(y) for squared loss."""
    target = torch.nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
    if loss == "squared":
        return logits - target
    return torch.softmax(logits, 1) - target


def _curvature_passes(
    inputs: AnalysisInputs, mc_labels: int = 0, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.dtype]]:
    """Per pass over the N' samples: its part of N' lam1 (S,), its rows (n, k, S) (the products r with sum r^T r =
    N' theta_s^T H_GN theta_s', k per sample) in float64, and the products' own dtype. One forward, and one
    activation-only backward per direction."""
    generator = torch.Generator().manual_seed(seed)
    if mc_labels > 0 and inputs.loss != "cross-entropy":
        raise AnalysisError(
            "sampled labels estimate the cross-entropy Gauss-Newton matrix only; use --mc-labels 0"
        )
    check_euler(inputs)
    plan = capture_plan(inputs)
    done = 0
    for x, y in inputs.passes():
        check_cancel(inputs.should_stop)
        if mc_labels > 0:
            _, v = output_direction_products(
                inputs, x, lambda out: sampled_label_directions(out, y, mc_labels, generator), plan
            )
            product_dtype, v = v.dtype, v.to(torch.float64)
            rows, first = v[:, :mc_labels] / mc_labels**0.5, v[:, mc_labels].sum(0)
        elif inputs.loss == "cross-entropy":
            # With g = products with e_d - e_y (d != y): A^T R A = g^T (diag(q) - q q^T) g and A^T (p - e_y) = g^T q.
            # D - 1 backward passes, no division by small probabilities.
            logits, g = output_direction_products(
                inputs, x, lambda out: label_difference_directions(out, y), plan
            )
            product_dtype, g = g.dtype, g.to(torch.float64)
            p = torch.softmax(logits.double(), 1)
            q = drop_label_column(p, y)
            gradient_products = torch.einsum("nk,nks->ns", q, g)
            first = gradient_products.sum(0)
            rows = cross_entropy_curvature_rows(g, q, p.gather(1, y.unsqueeze(1)), gradient_products)
        else:
            logits, a = jacobian_structure_products(inputs, x, plan)
            product_dtype, a = a.dtype, a.to(torch.float64)
            first = torch.einsum("nd,nds->s", loss_output_gradient(logits.double(), y, inputs.loss), a)
            rows = a
        yield first, rows, product_dtype
        done += len(y)
        report(inputs.progress, done / inputs.num_samples, "Gauss-Newton products")


def rows_per_sample(inputs: AnalysisInputs, mc_labels: int = 0) -> int:
    """Rows each sample adds to the factor of H_GN: the sampled labels, else D - 1 (cross-entropy) or D outputs."""
    if mc_labels > 0:
        return mc_labels
    with torch.no_grad():
        outputs = inputs.model(inputs.x[:1].to(inputs.device)).shape[-1]
    return outputs - 1 if inputs.loss == "cross-entropy" else outputs


@full_float32()
def gauss_newton_terms(
    inputs: AnalysisInputs,
    diagonal_only: bool = False,
    mc_labels: int = 0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam1 (S,), G) with G = theta_s^T H_GN theta_s' over the N' samples: (S, S), or its diagonal (S,) if asked.
    The matrix is kept in `dtype` where the analysis chose it (`curvature.choose_form`), else as `matrix_dtype` says."""
    if inputs.structures.shared:
        shared = inputs.structures.shared
        raise AnalysisError(
            f"SOSP-I reads each producer's output per sample, but the output of {shared[0]} is shared by the whole "
            "batch (as a position-bias MLP's is): use SOSP-H (method sosp-h), or exclude it "
            f"(--exclude '{shared[0]}'{' and the others: ' + ', '.join(shared[1:4]) if len(shared) > 1 else ''})"
        )
    s_count = inputs.structures.num_structures
    device, n_total = inputs.device, inputs.num_samples
    if diagonal_only:
        dtype = torch.float64
    elif dtype is None:
        dtype = matrix_dtype(s_count, device)
    gram = torch.zeros(s_count if diagonal_only else (s_count, s_count), dtype=dtype, device=device)
    first = torch.zeros(s_count, dtype=torch.float64, device=device)
    for first_part, rows, product_dtype in _curvature_passes(inputs, mc_labels, seed):
        first += first_part
        flat = rows.reshape(-1, s_count)
        if diagonal_only:
            gram += (flat**2).sum(0)
        else:
            with memory_phase(MATRIX):
                # In the products' own precision, at least float32 (float32 halves the time), summed into float64.
                add_gram(gram, flat.to(torch.promote_types(product_dtype, torch.float32)))
    if not diagonal_only:
        with memory_phase(MATRIX):
            mirror_gram(gram)
    return first / n_total, gram.div_(n_total)


@full_float32()
def gauss_newton_factor(
    inputs: AnalysisInputs, mc_labels: int = 0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam1 (S,), F (R, S)) with F^T F = theta_s^T H_GN theta_s' over the N' samples: the R x S factor of the
    Gauss-Newton matrix, R = N' x (rows per sample), kept in the products' precision (at least float32)."""
    s_count, n_total = inputs.structures.num_structures, inputs.num_samples
    first = torch.zeros(s_count, dtype=torch.float64, device=inputs.device)
    factor, filled = None, 0
    for first_part, rows, product_dtype in _curvature_passes(inputs, mc_labels, seed):
        first += first_part
        with memory_phase(MATRIX):
            if factor is None:  # every sample adds the same number of rows
                dtype = torch.promote_types(product_dtype, torch.float32)
                factor = torch.empty((n_total * rows.shape[1], s_count), dtype=dtype, device=inputs.device)
            flat = rows.reshape(-1, s_count)
            factor[filled : filled + len(flat)] = flat / n_total**0.5
            filled += len(flat)
    return first / n_total, factor


def pass_floor(inputs: AnalysisInputs) -> None:
    """SOSP-I's passes alone: the same forwards (the model as SOSP-I runs it) and the same D - 1 activation-only
    backward passes to the same outputs, without products, Gram matrix or selection. Its time is a lower bound on
    SOSP-I's (cross-entropy, exact labels) by construction: the benchmarks' floor."""
    plan = capture_plan(inputs)
    for x, y in inputs.passes():
        output_direction_products(
            inputs, x, lambda out, y=y: label_difference_directions(out, y), plan, products=False
        )


def gram_blocks(s_count: int) -> list[tuple[int, int]]:
    """Column blocks of the S x S matrix: at most GRAM_BLOCK_BYTES of float64 each, and at least 8 of them."""
    width = max(1, min(-(-s_count // 8), GRAM_BLOCK_BYTES // max(8 * s_count, 1)))
    return [(start, min(s_count, start + width)) for start in range(0, s_count, width)]


def add_gram(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """The upper block triangle of gram += rows^T rows, formed in rows' precision and added into gram's.

    Rows below a column block's diagonal square are left for `mirror_gram`: half the multiply-adds of the full product.
    """
    for start, stop in gram_blocks(rows.shape[1]):
        part = rows[:, :stop].T @ rows[:, start:stop]
        gram[:stop, start:stop] += part  # promoted or rounded to gram's dtype in place, no converted copy


def mirror_gram(gram: torch.Tensor) -> torch.Tensor:
    """Fill what `add_gram` leaves out (below each column block's diagonal square) from the symmetric upper part."""
    for start, stop in gram_blocks(gram.shape[0]):
        gram[stop:, start:stop] = gram[start:stop, stop:].T
    return gram


def matrix_bytes(s_count: int, dtype: torch.dtype = torch.float64) -> int:
    """Memory of SOSP-I's S x S matrix (Q is formed in place of it)."""
    return s_count * s_count * torch.tensor([], dtype=dtype).element_size()


def matrix_dtype(s_count: int, device: torch.device) -> torch.dtype:
    """float64 where the S x S matrix fits, float32 where only that fits (sums still formed in float64), else fail.

    Fails before any work, saying what the matrix needs and what to do.
    """
    free = 0.8 * available_memory(device) - GRAM_BLOCK_BYTES
    for dtype in (torch.float64, torch.float32):
        if matrix_bytes(s_count, dtype) <= free:
            return dtype
    need = matrix_bytes(s_count, torch.float32)
    raise AnalysisError(
        f"SOSP-I needs an S x S matrix over S = {s_count:,} structures: {need / 2**30:.1f} GiB in float32, but only "
        f"{available_memory(device) / 2**30:.1f} GiB is free on {device}. Use SOSP-H (no S x S matrix), exclude "
        "layers (--exclude), or run on a machine with more memory."
    )


def sosp_i_matrix(first: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Q[s, s'] = 1/2 |theta_s^T H theta_s'| + |lam1(s)| [s == s'] (paper eq. 3), formed in place of `gram`."""
    q = gram.abs_().mul_(0.5)
    q.diagonal().add_(first.abs())
    return q
