import pytest
import torch
from torch import nn

from conftest import USER_MODEL, random_mask
from sosp_engine.pruning.counting import count_macs, count_params
from sosp_engine.errors import MaskError
from sosp_engine.pruning.masks import mask_summary, prune_in_place, pruned_copy, zeroed_copy
from sosp_engine.nets import build_model
from sosp_engine.pruning.channel_trace import forget_traces
from sosp_engine.pruning.offered import find_structures

MODELS = [
    ("resnet20", "cifar-resnet", (1, 3, 32, 32)),
    ("resnet56", "cifar-resnet", (1, 3, 16, 16)),
    ("vgg19", None, (1, 3, 32, 32)),
    ("densenet40", None, (1, 3, 16, 16)),
    ("torchvision:resnet18", "torchvision-resnet", (1, 3, 32, 32)),
    ("torchvision:resnet18", None, (1, 3, 32, 32)),
    (USER_MODEL, None, (1, 3, 8, 8)),
]


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0].split('/')[-1]}-{m[1]}")
def case(request):
    spec, preset, shape = request.param
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(*shape)
    return model, find_structures(model, x, preset=preset), torch.randn(3, *shape[1:])


def test_structures_cover_every_channel_of_every_layer(case):
    _, structures, _ = case
    assert structures.num_structures == sum(layer.size for layer in structures.layers)
    assert len(set(structures.keys)) == structures.num_structures


def test_unpruned_counts_equal_the_model(case):
    model, structures, x = case
    assert structures.counts() == (count_params(model), count_macs(model, x))


@pytest.mark.parametrize("ratio", [0.3, 0.9])
def test_physical_pruning_equals_zeroing(case, ratio):
    model, structures, x = case
    mask = random_mask(structures, ratio, seed=int(ratio * 10))
    smaller = pruned_copy(model, structures, mask, x[:1]).eval()
    zeroed = zeroed_copy(model, structures, mask).eval()
    with torch.no_grad():
        assert torch.allclose(smaller(x), zeroed(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ratio", [0.3, 0.9])
def test_predicted_counts_equal_the_pruned_model(case, ratio):
    model, structures, x = case
    mask = random_mask(structures, ratio, seed=1)
    smaller = pruned_copy(model, structures, mask, x[:1])
    summary = mask_summary(structures, mask)
    assert summary["params_after"] == count_params(smaller)
    assert summary["macs_after"] == count_macs(smaller, x)
    assert summary["params_after"] < summary["params_before"]


def test_classifier_is_never_a_structure():
    model = build_model("resnet20")
    structures = find_structures(model, torch.randn(1, 3, 32, 32))
    assert all(not k.startswith("linear:") for k in structures.keys)
    assert "linear" in structures.excluded


def test_cifar_resnet_preset_excludes_the_downsampling_path():
    model = build_model("resnet20")
    keys = find_structures(model, torch.randn(1, 3, 32, 32), preset="cifar-resnet").keys
    all_keys = find_structures(model, torch.randn(1, 3, 32, 32)).keys
    assert len(keys) < len(all_keys)
    assert not any("layer2.0.conv2" in k or "shortcut" in k for k in keys)


def test_user_exclusion_patterns_remove_matching_layers():
    model = build_model("vgg19")
    structures = find_structures(model, torch.randn(1, 3, 32, 32), exclude=["features.0", "features.1*"])
    names = [layer.name for layer in structures.layers]
    assert "features.0" not in names and "features.10" not in names and "features.3" in names


def test_keys_are_stable_across_weights():
    x = torch.randn(1, 3, 32, 32)
    a = find_structures(build_model("resnet20"), x, preset="cifar-resnet")
    torch.manual_seed(123)
    b = find_structures(build_model("resnet20"), x, preset="cifar-resnet")
    assert a.keys == b.keys and a.signature == b.signature


def test_finding_structures_keeps_training_mode():
    model = build_model("resnet20").train()
    find_structures(model, torch.randn(1, 3, 32, 32))
    assert all(m.training for m in model.modules())


def test_physical_pruning_keeps_modes_and_the_original():
    model = build_model("resnet20").train()
    x = torch.randn(1, 3, 32, 32)
    structures = find_structures(model, x, preset="cifar-resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smaller = pruned_copy(model, structures, random_mask(structures, 0.5), x)
    assert all(m.training for m in smaller.modules()) and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruning_removes_exactly_the_masked_channels_from_producers_norms_and_consumers():
    model = build_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    structures = find_structures(model, x, preset="cifar-resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_in_place(model, structures, {"layer1.0.conv1:3", "layer1.0.conv1:5"}, x)
    kept = [c for c in range(16) if c not in (3, 5)]
    assert torch.equal(model.layer1[0].conv1.weight, before["layer1.0.conv1.weight"][kept])
    assert torch.equal(model.layer1[0].bn1.running_mean, before["layer1.0.bn1.running_mean"][kept])
    assert torch.equal(model.layer1[0].conv2.weight, before["layer1.0.conv2.weight"][:, kept])
    assert model.layer1[0].conv1.out_channels == model.layer1[0].conv2.in_channels == 14


def test_a_mask_that_empties_a_layer_is_refused():
    model = build_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    structures = find_structures(model, x, preset="cifar-resnet")
    with pytest.raises(MaskError, match="every output channel of"):
        pruned_copy(model, structures, {f"layer1.0.conv1:{c}" for c in range(16)}, x)


def test_unknown_mask_keys_are_refused():
    model = build_model("resnet20")
    structures = find_structures(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(MaskError, match="not structures of this model"):
        structures.pruned_vector({"features.0:1"})


def test_a_model_torch_export_cannot_trace_is_a_clear_error(monkeypatch):
    def untraceable(*args, **kwargs):
        raise RuntimeError("data-dependent control flow")

    forget_traces()  # a trace of this architecture cached by an earlier test would not call export
    monkeypatch.setattr(torch.export, "export", untraceable)
    with pytest.raises(MaskError, match="torch.export cannot trace this model.*data-dependent"):
        find_structures(build_model("resnet20", 10, 3), torch.randn(1, 3, 8, 8))


class SpatialGate(nn.Module):
    """CBAM's spatial gate: one channel from the mean and max over channels, broadcast over the whole stream."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(pooled))


def test_a_gate_of_one_channel_broadcast_over_the_stream_couples_none_of_its_channels():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        SpatialGate(),
        nn.Conv2d(8, 16, 3),
        nn.Flatten(),
        nn.LazyLinear(4),
    )
    example = torch.randn(1, 3, 12, 12)
    model(example)
    structures = find_structures(model.eval(), example)
    sizes = {layer.name: layer.size for layer in structures.layers}
    assert sizes["0"] == 8 and sizes["2.conv"] == 1
    smaller = pruned_copy(model, structures, {"0:1", "0:6"}, example)
    assert smaller[0].out_channels == 7 - 1 and smaller[3].in_channels == 6
