"""Producers whose output does not scale with their rows: read before the activation, taken the exact way, or refused."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from sosp_engine.errors import AnalysisError
from sosp_engine.saliency.common import AnalysisInputs
from sosp_engine.saliency.homogeneity import not_scaling
from sosp_engine.saliency.sosp_h import scalable_producers, sosp_h_terms
from sosp_engine.saliency.sosp_i import gauss_newton_terms, jacobian_structure_products
from sosp_engine.pruning.offered import find_structures

from brute_force import directional_outputs, randomise_norms
from test_sosp_h_paths import StandardisedConv2d, assert_terms_close, explicit_terms

N, D = 5, 3


class ConvNormNet(nn.Module):
    """conv -> a norm module -> tanh -> global mean -> linear: the norm module is what each test varies."""

    def __init__(self, norm: nn.Module, conv: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv if conv is not None else nn.Conv2d(2, 4, 3, padding=1)
        self.norm = norm
        self.fc = nn.Linear(4, D)

    def forward(self, x):
        return self.fc(torch.tanh(self.norm(self.conv(x))).mean((2, 3)))


def inputs_for(norm: nn.Module, conv: nn.Module | None = None) -> AnalysisInputs:
    torch.manual_seed(0)
    model = ConvNormNet(norm, conv).double()
    randomise_norms(model.norm)
    model.eval()
    x = torch.randn(N, 2, 5, 5, dtype=torch.float64)
    return AnalysisInputs(
        model, find_structures(model, x[:1]), x, torch.randint(0, D, (N,)), "cross-entropy", 4
    )


def test_a_norm_with_a_smooth_activation_inside_is_read_before_the_activation():
    inputs = inputs_for(BatchNormAct2d(4, act_layer=nn.SiLU))
    _, products = jacobian_structure_products(inputs, inputs.x)
    torch.testing.assert_close(
        products, directional_outputs(inputs.model, inputs.structures, inputs.x), rtol=1e-10, atol=1e-12
    )


def test_sosp_i_first_order_terms_through_a_norm_act_equal_the_gradient():
    inputs = inputs_for(BatchNormAct2d(4, act_layer=nn.SiLU))
    first, _ = gauss_newton_terms(inputs)
    torch.testing.assert_close(first, explicit_terms(inputs)[0], rtol=1e-9, atol=1e-12)


def test_sosp_h_takes_the_channel_scale_path_through_a_norm_act_and_equals_the_explicit_hessian():
    inputs = inputs_for(BatchNormAct2d(4, act_layer=nn.SiLU))
    assert scalable_producers(inputs) is not None
    assert_terms_close(sosp_h_terms(inputs), explicit_terms(inputs))


def test_a_norm_without_affine_parameters_adds_nothing_to_phi_theta_s():
    inputs = inputs_for(nn.BatchNorm2d(4, affine=False))
    _, products = jacobian_structure_products(inputs, inputs.x)
    torch.testing.assert_close(
        products, directional_outputs(inputs.model, inputs.structures, inputs.x), rtol=1e-10, atol=1e-12
    )


def test_only_the_producers_that_do_not_scale_with_their_rows_are_listed():
    assert (
        not_scaling(inputs_for(BatchNormAct2d(4, act_layer=nn.ReLU))) == []
    )  # ReLU is positively homogeneous
    standardised = inputs_for(nn.BatchNorm2d(4), StandardisedConv2d(2, 4, 3, padding=1))
    assert not_scaling(standardised) == ["conv"]


def test_sosp_i_refuses_a_weight_standardised_conv_by_name_and_points_to_sosp_h():
    inputs = inputs_for(nn.BatchNorm2d(4), StandardisedConv2d(2, 4, 3, padding=1))
    with pytest.raises(AnalysisError, match=r"\['conv'\].*SOSP-H"):
        gauss_newton_terms(inputs)
    assert_terms_close(sosp_h_terms(inputs), explicit_terms(inputs))


class FunctionalNormNet(ConvNormNet):
    """Calls the norm's parameters through F.batch_norm: the norm module itself never runs."""

    def forward(self, x):
        h = self.conv(x)
        n = self.norm
        h = F.batch_norm(h, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        return self.fc(torch.tanh(h).mean((2, 3)))


def test_a_producer_that_never_runs_as_a_module_is_refused_by_sosp_i_and_exact_in_sosp_h():
    inputs = inputs_for(nn.BatchNorm2d(4))
    model = FunctionalNormNet(inputs.model.norm)
    model.load_state_dict(inputs.model.state_dict())
    inputs = AnalysisInputs(model.double().eval(), inputs.structures, inputs.x, inputs.y, "cross-entropy", 4)
    with pytest.raises(AnalysisError, match=r"\['norm'\] never ran"):
        gauss_newton_terms(inputs)
    assert_terms_close(sosp_h_terms(inputs), explicit_terms(inputs))
