"""How SOSP-I reads producer outputs: a copy only where a later op changes one in place, and a conv read only by its
BatchNorm run as one convolution with the norm folded in. Every way gives the brute-force products."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from sosp_engine.errors import AnalysisError
from sosp_engine.saliency import common
from sosp_engine.saliency.common import AnalysisInputs
from sosp_engine.saliency.sosp_i import (
    CapturePlan,
    capture_plan,
    gauss_newton_terms,
    jacobian_structure_products,
)
from sosp_engine.pruning.offered import find_structures

from brute_force import directional_outputs, randomise_norms

N, D = 5, 3


class ReluInPlaceWhenBatched(nn.Module):
    """relu_ on batches of more than one sample only: the one-sample probe cannot see it."""

    def forward(self, x):
        return x.relu_() if x.shape[0] > 1 else torch.relu(x)


class ResidualNet(nn.Module):
    """conv_a -> bn_a -> in-place ReLU; conv_b feeds bn_b and a residual add; bn_b's output is changed in place only in
    batches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)
        self.late = ReluInPlaceWhenBatched()
        self.fc = nn.Linear(4, D)

    def forward(self, x):
        h = self.relu(self.bn_a(self.conv_a(x)))
        b = self.conv_b(h)
        return self.fc(torch.tanh(self.late(self.bn_b(b)) + b).mean((2, 3)))


def residual_inputs() -> AnalysisInputs:
    torch.manual_seed(0)
    model = ResidualNet().double()
    randomise_norms(model.bn_a, model.bn_b)
    model.eval()
    x = torch.randn(N, 2, 5, 5, dtype=torch.float64)
    return AnalysisInputs(
        model, find_structures(model, x[:1]), x, torch.randint(0, D, (N,)), "cross-entropy", N
    )


def test_only_an_output_a_later_op_changes_in_place_is_copied():
    # bn_a is folded into conv_a, so the in-place ReLU changes conv_a's output; bn_b's output only in batches
    assert capture_plan(residual_inputs()).copied == {"conv_a"}


def test_a_conv_read_only_by_its_batchnorm_is_folded_with_it_and_one_read_twice_is_not():
    assert capture_plan(residual_inputs()).folded == {"bn_a": "conv_a"}


def test_products_of_a_folded_conv_and_batchnorm_equal_the_brute_force_ones():
    inputs = residual_inputs()
    plan = capture_plan(inputs)
    _, products = jacobian_structure_products(inputs, inputs.x, plan)
    torch.testing.assert_close(
        products, directional_outputs(inputs.model, inputs.structures, inputs.x), rtol=1e-10, atol=1e-12
    )


def test_an_output_changed_in_place_only_in_batches_is_read_again_with_a_copy():
    inputs = residual_inputs()
    plan = capture_plan(inputs)
    assert "bn_b" not in plan.copied
    _, products = jacobian_structure_products(inputs, inputs.x, plan)
    assert "bn_b" in plan.copied
    torch.testing.assert_close(
        products, directional_outputs(inputs.model, inputs.structures, inputs.x), rtol=1e-10, atol=1e-12
    )


def test_the_folded_path_gives_the_terms_of_copying_every_output_without_folding(monkeypatch):
    inputs = residual_inputs()
    first, gram = gauss_newton_terms(inputs)
    every = {"conv_a", "bn_a", "conv_b", "bn_b", "fc"}
    monkeypatch.setattr(
        "sosp_engine.saliency.sosp_i.capture_plan", lambda inputs: CapturePlan(set(every), {})
    )
    plain_first, plain_gram = gauss_newton_terms(inputs)
    torch.testing.assert_close(first, plain_first, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gram, plain_gram, rtol=1e-10, atol=1e-14)


def test_splitting_each_batch_into_one_sample_passes_keeps_the_terms(monkeypatch):
    inputs = residual_inputs()
    whole = gauss_newton_terms(inputs)
    monkeypatch.setattr(common, "CPU_PASS_BYTES", 1)
    assert inputs.pass_size() == 1
    for split, together in zip(gauss_newton_terms(inputs), whole):
        torch.testing.assert_close(split, together, rtol=1e-10, atol=1e-14)


def test_an_output_whose_gradient_the_backward_pass_never_reports_stops_sosp_i(monkeypatch):
    inputs = residual_inputs()
    plain, calls = torch.Tensor.register_hook, []

    def first_hook_lost(tensor, fn):
        calls.append(fn)
        return RemovableHandle(OrderedDict()) if len(calls) == 1 else plain(tensor, fn)

    monkeypatch.setattr(torch.Tensor, "register_hook", first_hook_lost)
    with pytest.raises(AnalysisError, match="no gradient at the outputs"):
        gauss_newton_terms(inputs)


class CheckpointedNet(ResidualNet):
    """The second block under activation checkpointing: its forward runs again inside the backward pass."""

    def forward(self, x):
        h = self.relu(self.bn_a(self.conv_a(x)))
        b = checkpoint(self.conv_b, h, use_reentrant=False)
        return self.fc(torch.tanh(self.bn_b(b) + b).mean((2, 3)))


def test_activation_checkpointing_keeps_the_products_exact():
    inputs = residual_inputs()
    model = CheckpointedNet().double().eval()
    model.load_state_dict(inputs.model.state_dict())
    inputs = AnalysisInputs(model, inputs.structures, inputs.x, inputs.y, "cross-entropy", N)
    _, products = jacobian_structure_products(inputs, inputs.x)
    torch.testing.assert_close(
        products, directional_outputs(model, inputs.structures, inputs.x), rtol=1e-10, atol=1e-12
    )


def test_a_linear_layer_folded_with_its_batchnorm_gives_the_brute_force_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, D)).double()
    randomise_norms(model[1])
    model.eval()
    x = torch.randn(N, 6, dtype=torch.float64)
    inputs = AnalysisInputs(
        model, find_structures(model, x[:1]), x, torch.randint(0, D, (N,)), "cross-entropy", N
    )
    plan = capture_plan(inputs)
    assert plan.folded == {"1": "0"}
    _, products = jacobian_structure_products(inputs, x, plan)
    torch.testing.assert_close(
        products, directional_outputs(model, inputs.structures, x), rtol=1e-10, atol=1e-12
    )


class DenseNet(nn.Module):
    """Two dense layers: each reads the concatenation of every earlier output through BatchNorm -> ReLU -> conv, so
    the stem's and conv1's channels reach several norms. `side_head`: a linear head reads the concatenation too."""

    def __init__(self, inplace: bool = False, side_head: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(5), nn.Conv2d(5, 2, 3, padding=1)
        self.bn3, self.fc = nn.BatchNorm2d(7), nn.Linear(7, D)
        self.relu = nn.ReLU(inplace=inplace)
        self.side = nn.Linear(7, D) if side_head else None

    def forward(self, x):
        h = self.stem(x)
        h = torch.cat([h, self.conv1(self.relu(self.bn1(h)))], 1)
        h = torch.cat([h, self.conv2(self.relu(self.bn2(h)))], 1)
        out = self.fc(self.relu(self.bn3(h)).mean((2, 3)))
        return out if self.side is None else out + self.side(torch.tanh(h).mean((2, 3)))


def dense_inputs(**kwargs) -> AnalysisInputs:
    torch.manual_seed(0)
    model = DenseNet(**kwargs).double()
    randomise_norms(model.bn1, model.bn2, model.bn3)
    model.eval()
    x = torch.randn(N, 2, 5, 5, dtype=torch.float64)
    return AnalysisInputs(
        model, find_structures(model, x[:1]), x, torch.randint(0, D, (N,)), "cross-entropy", N
    )


def test_norms_that_read_concatenated_producers_are_read_through_them():
    readers = capture_plan(dense_inputs()).read_by_norms
    assert readers.norms == {"bn1", "bn2", "bn3"} and set(readers.doubled) == {"stem", "conv1", "conv2"}


@pytest.mark.parametrize("inplace", [False, True])
def test_norms_read_through_their_producers_give_the_brute_force_products(inplace):
    inputs = dense_inputs(inplace=inplace)
    _, products = jacobian_structure_products(inputs, inputs.x)
    torch.testing.assert_close(
        products, directional_outputs(inputs.model, inputs.structures, inputs.x), rtol=1e-10, atol=1e-12
    )


def test_a_concatenation_read_by_anything_but_norms_keeps_every_norm_product():
    inputs = dense_inputs(side_head=True)
    plan = capture_plan(inputs)
    assert plan.read_by_norms.norms == set()
    _, products = jacobian_structure_products(inputs, inputs.x, plan)
    torch.testing.assert_close(
        products, directional_outputs(inputs.model, inputs.structures, inputs.x), rtol=1e-10, atol=1e-12
    )


def _counted_passes(monkeypatch, run, inputs) -> tuple[int, int, int]:
    """(forwards of the model, backward passes, product reductions) while `run(inputs)` runs."""
    from sosp_engine.saliency import sosp_i

    counts = {"grad": 0, "products": 0}
    real_grad, real_products = torch.autograd.grad, sosp_i._add_products

    def grad(*args, **kwargs):
        counts["grad"] += 1
        return real_grad(*args, **kwargs)

    def products(*args, **kwargs):
        counts["products"] += 1
        return real_products(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    monkeypatch.setattr(sosp_i, "_add_products", products)
    forwards = []
    handle = inputs.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        run(inputs)
    finally:
        handle.remove()
    return len(forwards), counts["grad"], counts["products"]


def test_the_benchmark_floor_runs_sosp_i_own_passes_and_none_of_its_products(monkeypatch):
    from sosp_engine.saliency.sosp_i import gauss_newton_terms, pass_floor

    inputs = residual_inputs()
    sosp_i = _counted_passes(monkeypatch, gauss_newton_terms, inputs)
    floor = _counted_passes(monkeypatch, pass_floor, inputs)
    # no forward SOSP-I does not do, the same backward passes: a lower bound on SOSP-I's time by construction
    assert floor[0] <= sosp_i[0] and floor[1] == sosp_i[1] > 0
    assert sosp_i[2] > 0 and floor[2] == 0


class TokenRowsNet(nn.Module):
    """LeViT's linear + BatchNorm1d on (samples x tokens) rows: the norm's output rows are not samples."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, D)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        rows = self.norm(self.fc(tokens).flatten(0, 1)).reshape(tokens.shape[0], tokens.shape[1], -1)
        return self.head(torch.tanh(rows).mean(1))


def test_products_of_a_norm_on_samples_times_tokens_rows_are_summed_per_sample():
    torch.manual_seed(0)
    model = TokenRowsNet().double()
    randomise_norms(model.norm)
    model.eval()
    x = torch.randn(N, 2, 3, 3, dtype=torch.float64)
    inputs = AnalysisInputs(
        model, find_structures(model, x[:1]), x, torch.randint(0, D, (N,)), "cross-entropy", N
    )
    _, products = jacobian_structure_products(inputs, inputs.x, capture_plan(inputs))
    torch.testing.assert_close(
        products, directional_outputs(inputs.model, inputs.structures, inputs.x), rtol=1e-10, atol=1e-12
    )


class PositionBiasNet(nn.Module):
    """Swin-V2's continuous position bias: an MLP over a fixed coordinate table, one output for the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(2, 4, 3, padding=1)
        self.register_buffer("coords", torch.linspace(-1, 1, 9).reshape(1, 9, 1))
        self.bias_mlp = nn.Sequential(nn.Linear(1, 5), nn.ReLU(), nn.Linear(5, 4))
        self.head = nn.Linear(4, D)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, 9, 4)
        return self.head(torch.tanh(tokens + self.bias_mlp(self.coords)).mean(1))


def test_sosp_i_refuses_a_producer_whose_output_is_shared_by_the_batch_naming_it():
    torch.manual_seed(0)
    model = PositionBiasNet().double().eval()
    x = torch.randn(N, 2, 3, 3, dtype=torch.float64)
    structures = find_structures(model, x[:1])
    assert structures.shared == ["bias_mlp.0", "bias_mlp.2"]
    inputs = AnalysisInputs(model, structures, x, torch.randint(0, D, (N,)), "cross-entropy", N)
    with pytest.raises(AnalysisError, match="output of bias_mlp.0 is shared by the whole batch.*sosp-h"):
        gauss_newton_terms(inputs)
