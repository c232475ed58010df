"""SOSP-H: lamH(s) = |theta_s . g| + 1/2 |theta_s . (H theta_struc)| with the exact Hessian (one HVP over N' samples)."""
from __future__ import annotations

import torch

from ..progress import check_cancel, report
from .common import AnalysisInputs, sample_losses, twice_differentiable


def gradient_and_hvp(inputs: AnalysisInputs, vector: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The mean-loss gradient and the Hessian-vector product H @ vector, by double backward, batch by batch."""
    params = inputs.params()
    grads: list[torch.Tensor] = []
    hvp: list[torch.Tensor] = []
    n = inputs.num_samples
    for i, (x, y) in enumerate(inputs.batches()):
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
        report(inputs.progress, min(1.0, (i + 1) * inputs.batch_size / n), "Hessian-vector product")
    return grads, hvp


def sosp_h_terms(inputs: AnalysisInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam1(s), theta_s . H theta_struc) for every structure, both signed."""
    grads, hvp = gradient_and_hvp(inputs, inputs.theta_struc())
    return inputs.per_structure(grads), inputs.per_structure(hvp)


def sosp_h_saliency(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """lamH(s) = |lam1(s)| + 1/2 |theta_s . H theta_struc| (paper eq. 7)."""
    return first.abs() + 0.5 * second.abs()
