"""First-order terms lam1(s) = theta_s . dL/dtheta, and the gradient itself."""

from __future__ import annotations

import torch

from ..progress import check_cancel, report
from .common import AnalysisInputs, sample_losses


def loss_gradient(inputs: AnalysisInputs) -> list[torch.Tensor]:
    """dL/dtheta of the mean loss over the N' samples, for the structure parameters."""
    params = inputs.params()
    grads = [torch.zeros_like(p) for p in params]
    n = inputs.num_samples
    for i, (x, y) in enumerate(inputs.batches()):
        check_cancel(inputs.should_stop)
        loss = sample_losses(inputs.model(x), y, inputs.loss).sum() / n
        for acc, g in zip(grads, torch.autograd.grad(loss, params)):
            acc += g
        report(inputs.progress, (i + 1) * inputs.batch_size / n, "gradient")
    return grads


def first_order_terms(inputs: AnalysisInputs, grads: list[torch.Tensor] | None = None) -> torch.Tensor:
    """lam1(s) for every structure (signed)."""
    return inputs.per_structure(grads if grads is not None else loss_gradient(inputs))
