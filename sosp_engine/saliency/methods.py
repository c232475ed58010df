"""The methods an analysis can run, each declared once: its name, its label and the function giving its terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..errors import AnalysisError
from .common import AnalysisInputs
from .first_order import first_order_terms
from .sosp_h import sosp_h_saliency, sosp_h_terms
from .curvature import FactorRows, MatrixRows, choose_form
from .sosp_i import gauss_newton_factor, gauss_newton_terms, rows_per_sample, sosp_i_matrix


class AnalysisOptions(Protocol):
    """What a kernel reads of an analysis's `AnalysisOptions` (all of it is there; `mc_labels` resolved to a count)."""

    seed: int
    mc_labels: int


@dataclass
class SaliencyTerms:
    """A method's per-structure saliency (S,) with its first- and second-order parts where it has them; `curvature`
    gives the rows of SOSP-I's Q, which its greedy selection (eq. 4) needs, kept in the form `curvature_form` says."""

    saliency: torch.Tensor
    first_order: torch.Tensor | None = None
    second_order: torch.Tensor | None = None
    curvature: MatrixRows | FactorRows | None = None
    estimate: str = "exact"
    curvature_form: str | None = None


@dataclass(frozen=True)
class Method:
    """One saliency method: `terms(inputs, options)` reads the analysis options it needs (its own knobs are declared
    in `AnalysisOptions`; `mc_labels` arrives resolved to a count); `greedy` methods select by eq. (4) with their Gram
    matrix, `gauss_newton` ones may sample labels for the Gauss-Newton matrix."""

    name: str
    label: str
    terms: Callable[[AnalysisInputs, AnalysisOptions], SaliencyTerms]
    greedy: bool = False
    gauss_newton: bool = False


def _sosp_h(inputs: AnalysisInputs, options: AnalysisOptions) -> SaliencyTerms:
    first, second = sosp_h_terms(inputs)
    return SaliencyTerms(sosp_h_saliency(first, second), first, second)


def _estimate(mc_labels: int) -> str:
    return f"monte-carlo ({mc_labels} sampled labels per sample)" if mc_labels > 0 else "exact"


def _diagonal(inputs: AnalysisInputs, options: AnalysisOptions) -> SaliencyTerms:
    seed, mc_labels = options.seed, options.mc_labels
    first, diag = gauss_newton_terms(inputs, diagonal_only=True, mc_labels=mc_labels, seed=seed)
    return SaliencyTerms(first.abs() + 0.5 * diag.abs(), first, diag, estimate=_estimate(mc_labels))


def _sosp_i(inputs: AnalysisInputs, options: AnalysisOptions) -> SaliencyTerms:
    seed, mc_labels = options.seed, options.mc_labels
    form = inputs.curvature or choose_form(
        inputs.structures.num_structures,
        inputs.num_samples,
        rows_per_sample(inputs, mc_labels),
        inputs.device,
    )
    if form.name == "factor":
        first, factor = gauss_newton_factor(inputs, mc_labels, seed)
        rows = FactorRows(first, factor)
        diag = rows.gram_diagonal
    else:
        first, gram = gauss_newton_terms(inputs, mc_labels=mc_labels, seed=seed, dtype=form.dtype)
        diag = gram.diagonal().to(torch.float64, copy=True)  # Q is formed in place of the matrix
        rows = MatrixRows(sosp_i_matrix(first, gram))
    return SaliencyTerms(first.abs() + 0.5 * diag, first, diag, rows, _estimate(mc_labels), form.describe())


def _first_order(inputs: AnalysisInputs, options: AnalysisOptions) -> SaliencyTerms:
    first = first_order_terms(inputs)
    return SaliencyTerms(first.abs(), first)


def _magnitude(inputs: AnalysisInputs, options: AnalysisOptions) -> SaliencyTerms:
    return SaliencyTerms(inputs.per_structure([p.detach().sign() for p in inputs.params()]))


def _random(inputs: AnalysisInputs, options: AnalysisOptions) -> SaliencyTerms:
    generator = torch.Generator().manual_seed(options.seed)
    return SaliencyTerms(
        torch.rand(inputs.structures.num_structures, generator=generator, dtype=torch.float64)
    )


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sosp-h", "SOSP-H (exact Hessian-vector product)", _sosp_h),
        Method(
            "sosp-i",
            "SOSP-I (Gauss-Newton, greedy with correlations)",
            _sosp_i,
            greedy=True,
            gauss_newton=True,
        ),
        Method("first-order", "First order (H = 0, SNIP-like)", _first_order),
        Method(
            "diagonal",
            "Diagonal (SOSP-I without cross-structure terms)",
            _diagonal,
            gauss_newton=True,
        ),
        Method("magnitude", "Magnitude (L1 norm of in-weights)", _magnitude),
        Method("random", "Random (seeded)", _random),
    )
}
METHODS = tuple(REGISTRY)
METHOD_LABELS = {name: method.label for name, method in REGISTRY.items()}


def method_named(name: str) -> Method:
    """The registered method called `name`, or a clear error listing them."""
    if name not in REGISTRY:
        raise AnalysisError(f"unknown method '{name}'; use one of {', '.join(METHODS)}")
    return REGISTRY[name]
