"""Each saliency against a brute-force reference (explicit Hessian / Jacobians) on a tiny float64 network."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp

from sosp_engine.saliency.common import AnalysisInputs, affine_batch_norms
from sosp_engine.saliency.first_order import first_order_terms
from sosp_engine.saliency.sosp_h import sosp_h_terms
from sosp_engine.saliency.sosp_i import (
    cross_entropy_curvature_rows,
    gauss_newton_terms,
    jacobian_structure_products,
    sosp_i_matrix,
)
from sosp_engine.pruning.offered import find_structures

from brute_force import flat, mean_loss_of, randomise_norms, theta_s_vectors, unflat

N, D = 6, 3


class TinyNet(nn.Module):
    """conv+bias, conv+BN, a residual add (couples two convs), a hidden linear layer and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(2, 4, 3, padding=1, bias=True)
        self.conv1 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, D)

    def forward(self, x):
        h = torch.tanh(self.conv0(x))
        h = torch.tanh(self.bn1(self.conv1(h)))
        r = torch.tanh(self.bn2(self.conv2(h)) + h)
        return self.fc2(torch.tanh(self.fc1(r.mean((2, 3)))))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyNet().double()
    randomise_norms(model.bn1, model.bn2)
    model.eval()
    x = torch.randn(N, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, D, (N,))
    structures = find_structures(model, x[:1])
    return model, structures, x, y


def make_inputs(tiny, loss="cross-entropy", batch_size=4):
    model, structures, x, y = tiny
    return AnalysisInputs(model, structures, x, y, loss, batch_size)


def test_tiny_net_has_the_structures_the_proof_needs(tiny):
    _, structures, _, _ = tiny
    assert [(l.name, l.size) for l in structures.layers] == [("conv0", 4), ("conv1", 3), ("fc1", 5)]
    assert set(structures.layers[1].producers) == {"conv1", "bn1", "conv2", "bn2"}


@pytest.mark.parametrize(
    "layer", ["conv0", "conv1", "fc1"], ids=["conv-with-bias", "conv-bn-residual", "linear"]
)
def test_gradient_x_activation_equals_jvp_with_tangent_theta_s(tiny, layer):
    model, structures, x, _ = tiny
    _, a = jacobian_structure_products(make_inputs(tiny), x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    for s, key in enumerate(structures.keys):
        if not key.startswith(layer + ":"):
            continue
        tangent = theta_s_vectors(model, structures)[s]
        _, directional = jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangent,))
        torch.testing.assert_close(a[:, :, s], directional, rtol=1e-10, atol=1e-12)


def test_first_order_terms_equal_theta_s_dot_autograd_gradient(tiny):
    model, structures, x, y = tiny
    theta = flat(model, dict(model.named_parameters())).detach()
    grad = torch.func.grad(mean_loss_of(model, x, y, "cross-entropy"))(theta)
    expected = torch.stack([flat(model, v) @ grad for v in theta_s_vectors(model, structures)])
    torch.testing.assert_close(first_order_terms(make_inputs(tiny)), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross-entropy", "squared"])
def test_sosp_h_second_order_equals_explicit_hessian(tiny, loss):
    model, structures, x, y = tiny
    theta = flat(model, dict(model.named_parameters())).detach()
    hessian = torch.autograd.functional.hessian(mean_loss_of(model, x, y, loss), theta)
    thetas = torch.stack([flat(model, v) for v in theta_s_vectors(model, structures)])
    expected = thetas @ (hessian @ thetas.sum(0))
    first, second = sosp_h_terms(make_inputs(tiny, loss))
    torch.testing.assert_close(second, expected, rtol=1e-9, atol=1e-12)
    grad = torch.func.grad(mean_loss_of(model, x, y, loss))(theta)
    torch.testing.assert_close(first, thetas @ grad, rtol=1e-10, atol=1e-12)


def reference_gauss_newton(tiny, loss):
    model, structures, x, _ = tiny
    theta = flat(model, dict(model.named_parameters())).detach()
    thetas = torch.stack([flat(model, v) for v in theta_s_vectors(model, structures)])
    total = torch.zeros(structures.num_structures, structures.num_structures, dtype=torch.float64)
    for n in range(N):
        f = lambda t: functional_call(model, unflat(model, t), (x[n : n + 1],))[0]
        jac = jacrev(f)(theta)  # explicit per-sample Jacobian, D x P
        logits = f(theta).detach()
        if loss == "squared":
            r = torch.eye(D, dtype=torch.float64)
        else:
            p = torch.softmax(logits, 0)
            r = torch.diag(p) - torch.outer(p, p)
        phi_theta = jac @ thetas.T  # D x S
        total += phi_theta.T @ r @ phi_theta
    return total / N


@pytest.mark.parametrize("loss", ["cross-entropy", "squared"])
def test_sosp_i_gauss_newton_matrix_equals_explicit_jacobians(tiny, loss):
    _, gram = gauss_newton_terms(make_inputs(tiny, loss))
    expected = reference_gauss_newton(tiny, loss)
    torch.testing.assert_close(gram, expected, rtol=1e-9, atol=1e-12)
    assert (expected - torch.diag(expected.diagonal())).abs().max() > 1e-4  # off-diagonals are really checked


def test_a_float32_net_gets_the_gauss_newton_matrix_to_float32_precision(tiny):
    model, structures, x, y = tiny
    single = copy.deepcopy(model).float()
    _, gram = gauss_newton_terms(AnalysisInputs(single, structures, x.float(), y, "cross-entropy", 4))
    expected = reference_gauss_newton(tiny, "cross-entropy")
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("p_label", [1e-12, 0.3, 1 - 1e-12])
def test_cross_entropy_curvature_rows_square_to_g_t_r_g_at_any_confidence(p_label):
    torch.manual_seed(0)
    n, k, s = 3, 4, 5
    g = torch.randn(n, k, s, dtype=torch.float64)
    q = torch.rand(n, k, dtype=torch.float64)
    q = q / q.sum(1, keepdim=True) * (1 - p_label)
    rows = cross_entropy_curvature_rows(
        g, q, torch.full((n, 1), p_label, dtype=torch.float64), torch.einsum("nk,nks->ns", q, g)
    )
    r = torch.diag_embed(q) - q.unsqueeze(2) * q.unsqueeze(1)
    expected = torch.einsum("nks,nkj,njt->st", g, r, g)
    torch.testing.assert_close(rows.reshape(-1, s).T @ rows.reshape(-1, s), expected, rtol=1e-10, atol=1e-14)


def test_sosp_i_q_matrix_matches_eq3(tiny):
    first, gram = gauss_newton_terms(make_inputs(tiny))
    q = sosp_i_matrix(first, gram)
    expected = 0.5 * reference_gauss_newton(tiny, "cross-entropy").abs() + torch.diag(first.abs())
    torch.testing.assert_close(q, expected, rtol=1e-9, atol=1e-12)


def test_diagonal_baseline_is_the_diagonal_of_the_gauss_newton_matrix(tiny):
    _, diag = gauss_newton_terms(make_inputs(tiny), diagonal_only=True)
    torch.testing.assert_close(
        diag, reference_gauss_newton(tiny, "cross-entropy").diagonal(), rtol=1e-9, atol=1e-12
    )


def test_sampled_labels_estimate_is_unbiased(tiny):
    first_exact, exact = gauss_newton_terms(make_inputs(tiny))
    first_mc, estimate = gauss_newton_terms(make_inputs(tiny), mc_labels=4000, seed=1)
    torch.testing.assert_close(first_mc, first_exact, rtol=1e-9, atol=1e-12)
    assert (estimate - exact).abs().max() < 0.05 * exact.abs().max()


def test_batch_size_does_not_change_the_result(tiny):
    _, a = gauss_newton_terms(make_inputs(tiny, batch_size=1))
    _, b = gauss_newton_terms(make_inputs(tiny, batch_size=N))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_gram_is_summed_in_column_blocks_without_changing_it(tiny, monkeypatch):
    from sosp_engine.saliency import sosp_i

    _, whole = gauss_newton_terms(make_inputs(tiny))
    monkeypatch.setattr(sosp_i, "GRAM_BLOCK_BYTES", 8 * 3 * whole.shape[0])  # three columns per block
    _, blocked = gauss_newton_terms(make_inputs(tiny))
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-15)


def test_a_matrix_too_large_for_float64_is_kept_in_float32_with_the_same_greedy_order(tiny, monkeypatch):
    from sosp_engine.saliency import sosp_i
    from sosp_engine.saliency.selection import greedy_order

    inputs = make_inputs(tiny)
    first, exact = gauss_newton_terms(inputs)
    s = exact.shape[0]
    monkeypatch.setattr(sosp_i, "GRAM_BLOCK_BYTES", 8 * s)
    monkeypatch.setattr(sosp_i, "available_memory", lambda device: (6 * s * s + 8 * s) / 0.8)
    _, single = gauss_newton_terms(inputs)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-6, atol=1e-9)
    order64, n64 = greedy_order(sosp_i_matrix(first, exact.clone()), inputs.structures)
    order32, n32 = greedy_order(sosp_i_matrix(first, single), inputs.structures)
    assert n32 == n64 and torch.equal(order32[:n32], order64[:n64])


def test_the_predicted_increase_of_each_sosp_i_prefix_is_eq_2_evaluated_directly(tiny):
    from sosp_engine.saliency.analysis import AnalysisOptions, compute_saliency

    model, structures, x, y = tiny
    theta = flat(model, dict(model.named_parameters())).detach().requires_grad_(True)
    grad = torch.autograd.grad(mean_loss_of(model, x, y, "cross-entropy")(theta), theta)[0]
    thetas = torch.stack([flat(model, v) for v in theta_s_vectors(model, structures)])
    lam1, gn = thetas @ grad, reference_gauss_newton(tiny, "cross-entropy")
    ranking = compute_saliency(make_inputs(tiny), AnalysisOptions(method="sosp-i", cap=1.0), "none")
    order, prefix = ranking.pruning_order, ranking.predicted_prefix
    for k in range(1, ranking.n_prunable + 1):
        mask = order[:k]
        eq2 = lam1[mask].abs().sum() + 0.5 * gn[mask][:, mask].abs().sum()
        torch.testing.assert_close(prefix[k], eq2, rtol=1e-9, atol=1e-12)


def test_the_predicted_increase_of_other_methods_is_the_sum_of_their_saliencies(tiny):
    from sosp_engine.saliency.analysis import AnalysisOptions, compute_saliency

    ranking = compute_saliency(make_inputs(tiny), AnalysisOptions(method="sosp-h", cap=1.0), "none")
    order, k = ranking.pruning_order, ranking.n_prunable
    torch.testing.assert_close(ranking.predicted_prefix[k], ranking.saliency[order[:k]].sum())


@pytest.mark.parametrize("affine", [True, False])
def test_eval_batchnorm_as_an_affine_map_has_the_same_output_gradients_and_hessian_products(affine):
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(3, affine=affine).double()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    if affine:
        norm.weight.data.normal_()
        norm.bias.data.normal_()
    norm.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    leaves = [x] + list(norm.parameters())

    def first_and_second(module):
        loss = (module(x) ** 3).sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        hvp = torch.autograd.grad(sum((g * g.detach()).sum() for g in grads), leaves)
        return [g.detach() for g in grads], hvp

    native = first_and_second(norm)
    with affine_batch_norms(norm):
        assert "forward" in vars(norm)
        patched = first_and_second(norm)
    assert "forward" not in vars(norm)
    for a, b in zip(native[0] + list(native[1]), patched[0] + list(patched[1])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_batchnorm_subclass_with_its_own_forward_keeps_it_during_an_analysis():
    from timm.layers import BatchNormAct2d

    norm = BatchNormAct2d(3).eval()  # BatchNorm followed by its activation, in its own forward
    with affine_batch_norms(norm):
        assert "forward" not in vars(norm)


def test_theta_struc_is_theta_on_structure_rows_and_zero_elsewhere_without_copying_whole_parameters(tiny):
    from dataclasses import replace

    from sosp_engine.saliency.common import structure_slices

    model, structures, x, y = tiny
    slices = structure_slices(model, structures)
    partial = next(i for i, s in enumerate(slices) if s.param is model.conv1.weight)
    slices[partial] = replace(
        slices[partial], channels=slices[partial].channels[:1], structure=slices[partial].structure[:1]
    )
    inputs = AnalysisInputs(model, structures, x, y, "cross-entropy", 4, slices=slices)
    vectors = dict(zip(map(id, inputs.params()), inputs.theta_struc()))
    conv1 = vectors[id(model.conv1.weight)]
    assert torch.equal(conv1[:1], model.conv1.weight[:1].detach()) and not conv1[1:].any()
    assert vectors[id(model.bn1.weight)].data_ptr() == model.bn1.weight.data_ptr()
