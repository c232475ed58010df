import pytest
import torch

from sosp_engine.errors import ModelSpecError
from sosp_engine.nets import build_model, is_user_code


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet56_has_the_papers_parameter_count():
    assert n_params(build_model("resnet56")) == 855_770


@pytest.mark.parametrize(
    "spec,low,high", [("vgg19", 19.9e6, 20.1e6), ("densenet40", 1.0e6, 1.1e6), ("resnet20", 0.27e6, 0.28e6)]
)
def test_zoo_models_match_published_sizes(spec, low, high):
    assert low <= n_params(build_model(spec)) <= high


def test_width_multiplier_scales_every_stage():
    model = build_model("resnet32x4")
    assert model.conv1.out_channels == 64 and model.layer3[0].conv2.out_channels == 256


def test_explicit_stage_widths_set_each_stage():
    model = build_model("resnet20:widths=16,32,128")
    assert model.layer2[0].conv1.out_channels == 32 and model.layer3[2].conv2.out_channels == 128


def test_inner_widths_set_each_block():
    model = build_model("resnet20:inner=" + ",".join(["8"] * 9))
    assert model.layer1[0].conv1.out_channels == 8 and model.layer1[0].conv2.out_channels == 16


def test_vgg_widths_set_each_conv_layer():
    widths = [32] * 15 + [7]
    model = build_model("vgg19:widths=" + ",".join(map(str, widths)))
    assert model.classifier.in_features == 7


def test_densenet_growth_per_block():
    model = build_model("densenet40:growth=12,12,24")
    assert model.block3[0].conv.out_channels == 24


@pytest.mark.parametrize("spec", ["resnet20", "vgg19", "densenet40", "torchvision:resnet18"])
def test_models_take_num_classes_and_in_channels(spec):
    model = build_model(spec, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_user_factory_from_file(user_model_spec):
    model = build_model(user_model_spec, num_classes=4, in_channels=2)
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 4)
    assert is_user_code(user_model_spec)


def test_user_factory_from_module_path():
    model = build_model("tests.fixtures.user_model:build")
    assert isinstance(model, torch.nn.Module)


def test_a_factory_of_an_installed_package_is_refused_unimported():
    with pytest.raises(ModelSpecError, match="installed package"):
        build_model("torch.nn:Identity")


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("resnet57", "unknown model"),
        ("torchvision:not_a_net", "torchvision has no model"),
        ("/nonexistent/file.py:build", "does not exist"),
        ("resnet20:widths=16,32", "3 stages"),
        ("resnet20:depth=4", "unknown model option"),
        ("tests.fixtures.user_model:not_there", "no callable"),
    ],
)
def test_bad_model_specs_fail_clearly(spec, fragment):
    with pytest.raises(ModelSpecError, match=fragment):
        build_model(spec)
