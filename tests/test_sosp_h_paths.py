"""SOSP-H's two ways to the same numbers: the channel-scale HVP (plain layers) and the parameter HVP (any layer)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from sosp_engine.saliency import common, pairing
from sosp_engine.saliency.common import AnalysisInputs, affine_batch_norm_modules
from sosp_engine.saliency.pairing import sole_norm_consumers
from sosp_engine.saliency.sosp_h import (
    _FixedWeightConv,
    channel_scale_terms,
    gradient_and_hvp,
    scalable_producers,
    sosp_h_terms,
)
from sosp_engine.pruning.offered import find_structures

from brute_force import flat, mean_loss_of, randomise_norms, theta_s_vectors

N, D = 5, 3


class MixedNet(nn.Module):
    """A strided grouped conv with GroupNorm, then linear layers with a LayerNorm between them."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.gn = nn.GroupNorm(2, 4)
        self.fc1 = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, D)

    def forward(self, x):
        h = torch.tanh(self.gn(self.conv(x))).mean((2, 3))
        return self.fc2(torch.tanh(self.ln(self.fc1(h))))


class StandardisedConv2d(nn.Conv2d):
    """Weight standardisation (as timm's StdConv2d): the output does not scale with the weight rows."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def mixed_inputs(conv: nn.Module, loss: str = "cross-entropy", batch_size: int = 4) -> AnalysisInputs:
    torch.manual_seed(0)
    model = MixedNet(conv).double()
    randomise_norms(model.gn, model.ln)
    model.eval()
    x = torch.randn(N, 2, 7, 7, dtype=torch.float64)
    y = torch.randint(0, D, (N,))
    return AnalysisInputs(model, find_structures(model, x[:1]), x, y, loss, batch_size)


def plain_conv() -> nn.Module:
    return nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2)


def explicit_terms(inputs: AnalysisInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """theta_s . g and theta_s . H theta_struc from the explicit float64 Hessian."""
    model = inputs.model
    theta = flat(model, dict(model.named_parameters())).detach()
    loss = mean_loss_of(model, inputs.x, inputs.y, inputs.loss)
    hessian = torch.autograd.functional.hessian(loss, theta)
    thetas = torch.stack([flat(model, v) for v in theta_s_vectors(model, inputs.structures)])
    return thetas @ torch.func.grad(loss)(theta), thetas @ (hessian @ thetas.sum(0))


def assert_terms_close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_plain_conv_norm_and_linear_producers_take_the_channel_scale_path():
    inputs = mixed_inputs(plain_conv())
    rows = scalable_producers(inputs)
    assert rows is not None and set(rows) == {p.module for p in inputs.structures.producers}


@pytest.mark.parametrize("loss", ["cross-entropy", "squared"])
def test_the_channel_scale_path_equals_the_explicit_hessian_with_group_and_layer_norms(loss):
    inputs = mixed_inputs(plain_conv(), loss)
    assert_terms_close(sosp_h_terms(inputs), explicit_terms(inputs))


def test_the_channel_scale_path_equals_the_parameter_path():
    inputs = mixed_inputs(plain_conv())
    grads, hvp = gradient_and_hvp(inputs, inputs.theta_struc())
    assert_terms_close(sosp_h_terms(inputs), (inputs.per_structure(grads), inputs.per_structure(hvp)))


def test_a_weight_standardised_conv_takes_the_parameter_path_and_stays_exact():
    inputs = mixed_inputs(StandardisedConv2d(2, 4, 3, stride=2, padding=1, groups=2))
    assert scalable_producers(inputs) is None
    assert_terms_close(sosp_h_terms(inputs), explicit_terms(inputs))


def test_a_producer_with_a_forward_hook_takes_the_parameter_path_and_stays_exact():
    conv = plain_conv()
    conv.register_forward_hook(
        lambda module, args, out: out * out
    )  # the output is no longer linear in the rows
    inputs = mixed_inputs(conv)
    assert scalable_producers(inputs) is None
    assert_terms_close(sosp_h_terms(inputs), explicit_terms(inputs))


def test_splitting_each_batch_into_smaller_passes_keeps_the_terms(monkeypatch):
    inputs = mixed_inputs(plain_conv())
    whole = sosp_h_terms(inputs)
    monkeypatch.setattr(common, "CPU_PASS_BYTES", 1)  # one sample per pass
    assert inputs.pass_size() == 1
    assert_terms_close(sosp_h_terms(inputs), whole)


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv1d(2, 4, 3, stride=2, padding=1), (2, 2, 8)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 7, 6)),
        (nn.Conv3d(2, 2, 2, stride=(1, 2, 2), bias=False), (1, 2, 3, 5, 5)),
    ],
    ids=["1d-strided", "2d-grouped-dilated-odd", "3d-no-bias"],
)
def test_a_fixed_weight_convolution_has_torch_s_input_gradient_and_its_derivative(conv, shape):
    conv = conv.double().requires_grad_(False)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_FixedWeightConv.apply(x, conv), conv(x))
    assert gradcheck(lambda t: _FixedWeightConv.apply(t, conv), (x,))
    assert gradgradcheck(lambda t: _FixedWeightConv.apply(t, conv) ** 2, (x,))


class ConvBnNet(nn.Module):
    """conv_a is read by its BatchNorm only; conv_b's output also feeds a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, D)

    def forward(self, x):
        h = torch.tanh(self.bn_a(self.conv_a(x)))
        b = self.conv_b(h)
        return self.fc(torch.tanh(self.bn_b(b) + b).mean((2, 3)))


def conv_bn_inputs(loss: str = "cross-entropy") -> AnalysisInputs:
    torch.manual_seed(0)
    model = ConvBnNet().double()
    randomise_norms(model.bn_a, model.bn_b)
    model.eval()
    x = torch.randn(N, 2, 5, 5, dtype=torch.float64)
    return AnalysisInputs(model, find_structures(model, x[:1]), x, torch.randint(0, D, (N,)), loss, 4)


def test_a_conv_read_only_by_its_batchnorm_is_paired_with_it_and_one_read_twice_is_not():
    inputs = conv_bn_inputs()
    affine = {id(m) for m in affine_batch_norm_modules(inputs.model)}
    assert sole_norm_consumers(inputs, list(scalable_producers(inputs)), affine) == {"bn_a": "conv_a"}


@pytest.mark.parametrize("loss", ["cross-entropy", "squared"])
def test_a_conv_alpha_joined_to_its_batchnorm_scale_keeps_the_terms_exact(loss):
    inputs = conv_bn_inputs(loss)
    terms = channel_scale_terms(inputs, scalable_producers(inputs))
    assert terms is not None
    assert_terms_close(terms, explicit_terms(inputs))


class TwiceReadNet(ConvBnNet):
    """conv_a's output feeds its BatchNorm and, directly, the logits."""

    def forward(self, x):
        a = self.conv_a(x)
        b = self.conv_b(torch.tanh(self.bn_a(a)))
        return self.fc(torch.tanh(self.bn_b(b) + b).mean((2, 3))) + a.mean((1, 2, 3))[:, None]


def test_a_second_reader_the_call_count_misses_is_caught_by_the_output_check(monkeypatch):
    inputs = conv_bn_inputs()
    model = TwiceReadNet().double().eval()
    model.load_state_dict(inputs.model.state_dict())
    inputs = AnalysisInputs(model, inputs.structures, inputs.x, inputs.y, "cross-entropy", 4)
    affine = {id(m) for m in affine_batch_norm_modules(model)}
    monkeypatch.setattr(
        pairing._TensorUses,
        "__torch_function__",  # as if every reader were a TorchScript function
        lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {})),
    )
    assert sole_norm_consumers(inputs, list(scalable_producers(inputs)), affine) == {}
