"""Brute-force references shared by the saliency tests: theta_s as full parameter vectors and the mean loss of a
flat parameter vector."""

import torch
from torch import nn
from torch.func import functional_call

from sosp_engine.saliency.common import sample_losses


def theta_s_vectors(model, structures):
    """theta_s as dicts of full-size tensors (zero outside the structure), one per structure."""
    names = dict(model.named_parameters())
    vectors = [{k: torch.zeros_like(v) for k, v in names.items()} for _ in range(structures.num_structures)]
    for piece in structures.producers:
        transposed = isinstance(model.get_submodule(piece.module), nn.modules.conv._ConvTransposeNd)
        for pname in ("weight", "bias"):
            full = f"{piece.module}.{pname}"
            if full in names:
                for c, s in zip(piece.channels.tolist(), piece.structure.tolist()):
                    if (
                        transposed and pname == "weight"
                    ):  # (in, out, kernel...): an output channel is a column
                        vectors[s][full][:, c] = names[full].detach()[:, c]
                    else:
                        vectors[s][full][c] = names[full].detach()[c]
    return vectors


def flat(model, vector):
    return torch.cat([vector[k].flatten() for k, _ in model.named_parameters()])


def unflat(model, theta):
    out, i = {}, 0
    for k, p in model.named_parameters():
        out[k] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def mean_loss_of(model, x, y, loss):
    return lambda theta: sample_losses(functional_call(model, unflat(model, theta), (x,)), y, loss).mean()


def directional_outputs(model, structures, x):
    """(n, D, S): the output's derivative along theta_s for every structure s, by forward-mode autodiff."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    columns = [
        torch.func.jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangent,))[1]
        for tangent in theta_s_vectors(model, structures)
    ]
    return torch.stack(columns, dim=2)


def randomise_norms(*norms) -> None:
    """Non-trivial running statistics and affine parameters for the norms of a test net (fresh ones are 0 and 1)."""
    with torch.no_grad():
        for norm in norms:
            if getattr(norm, "running_mean", None) is not None:
                norm.running_mean.uniform_(-0.3, 0.3)
                norm.running_var.uniform_(0.5, 2.0)
            if getattr(norm, "weight", None) is not None:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.3, 0.3)
