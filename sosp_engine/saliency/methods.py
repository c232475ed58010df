"""The methods an analysis can run, each declared once: its name, its label and the function giving its terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import AnalysisError
from .common import AnalysisInputs
from .first_order import first_order_terms
from .sosp_h import sosp_h_saliency, sosp_h_terms
from .sosp_i import gauss_newton_terms


@dataclass
class SaliencyTerms:
    """A method's per-structure saliency (S,) with its first- and second-order parts where it has them; `gram` is
    SOSP-I's (S, S) Gauss-Newton matrix, which its greedy selection (eq. 4) needs."""

    saliency: torch.Tensor
    first_order: torch.Tensor | None = None
    second_order: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    estimate: str = "exact"


@dataclass(frozen=True)
class Method:
    """One saliency method: `terms(inputs, seed, mc_labels)`; `greedy` methods select by eq. (4) with their Gram matrix,
    `gauss_newton` ones may sample labels for the Gauss-Newton matrix."""

    name: str
    label: str
    terms: Callable[[AnalysisInputs, int, int], SaliencyTerms]
    greedy: bool = False
    gauss_newton: bool = False


def _sosp_h(inputs: AnalysisInputs, seed: int, mc_labels: int) -> SaliencyTerms:
    first, second = sosp_h_terms(inputs)
    return SaliencyTerms(sosp_h_saliency(first, second), first, second)


def _gauss_newton(diagonal_only: bool) -> Callable[[AnalysisInputs, int, int], SaliencyTerms]:
    def terms(inputs: AnalysisInputs, seed: int, mc_labels: int) -> SaliencyTerms:
        first, gram = gauss_newton_terms(inputs, diagonal_only=diagonal_only, mc_labels=mc_labels, seed=seed)
        diag = gram if diagonal_only else gram.diagonal()
        estimate = f"monte-carlo ({mc_labels} sampled labels per sample)" if mc_labels > 0 else "exact"
        return SaliencyTerms(
            first.abs() + 0.5 * diag.abs(), first, diag.clone(), None if diagonal_only else gram, estimate
        )

    return terms


def _first_order(inputs: AnalysisInputs, seed: int, mc_labels: int) -> SaliencyTerms:
    first = first_order_terms(inputs)
    return SaliencyTerms(first.abs(), first)


def _magnitude(inputs: AnalysisInputs, seed: int, mc_labels: int) -> SaliencyTerms:
    return SaliencyTerms(inputs.per_structure([p.detach().sign() for p in inputs.params()]))


def _random(inputs: AnalysisInputs, seed: int, mc_labels: int) -> SaliencyTerms:
    generator = torch.Generator().manual_seed(seed)
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
            _gauss_newton(False),
            greedy=True,
            gauss_newton=True,
        ),
        Method("first-order", "First order (H = 0, SNIP-like)", _first_order),
        Method(
            "diagonal",
            "Diagonal (SOSP-I without cross-structure terms)",
            _gauss_newton(True),
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
