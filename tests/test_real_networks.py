"""Grouped convolutions, GroupNorm, gates and pruned checkpoints: structures that always prune physically, exact counts,
and an honest statement where removal is not zeroing."""

import dataclasses

import pytest
import torch

from conftest import ROOT, random_mask
from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis, train_mode_batches
from sosp_engine.pruning.counting import count_macs, count_params
from sosp_engine.errors import ModelSpecError
from sosp_engine.pruning.exactness import approximate_layers, output_deviation
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.pruning.masks import mask_summary, pruned_copy, zeroed_copy
from sosp_engine.nets import build_model, is_user_code
from sosp_engine.saliency.common import twice_differentiable
from sosp_engine.errors import MaskError
from sosp_engine.pruning.offered import find_structures

FIXTURE = ROOT / "tests" / "fixtures" / "grouped_model.py"
GROUPED, GATED, NORM_MLP = f"{FIXTURE}:build", f"{FIXTURE}:build_gated", f"{FIXTURE}:build_norm_mlp"
SLICED, SLICED_SHALLOW = f"{FIXTURE}:build_sliced", f"{FIXTURE}:build_sliced_shallow"
GHOST, SK = f"{FIXTURE}:build_ghost", f"{FIXTURE}:build_sk"
X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def trained_like(spec: str) -> torch.nn.Module:
    """A seeded model in eval mode whose BatchNorm statistics are not the init ones (as after training)."""
    torch.manual_seed(0)
    model = build_model(spec).eval()
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-1, 1, generator=gen)
            m.running_var.uniform_(0.5, 2, generator=gen)
    return model


def assert_pruned_equals_zeroed(model, structures, mask) -> torch.nn.Module:
    """The physically pruned model computes what the zero-masked one does on X; returns the pruned model."""
    smaller, zeroed = pruned_copy(model, structures, mask, X[:1]).eval(), zeroed_copy(model, structures, mask)
    with torch.no_grad():
        assert torch.allclose(smaller(X), zeroed(X), atol=1e-5)
    return smaller


@pytest.fixture(scope="module")
def grouped():
    model = trained_like(GROUPED)
    return model, find_structures(model, X[:1])


def test_a_grouped_conv_structure_is_one_local_position_in_every_group(grouped):
    _, structures = grouped
    layers = {layer.name: layer for layer in structures.layers}
    assert [(n, l.size, l.channels) for n, l in layers.items()] == [
        ("stem.0", 4, 8),
        ("g2", 4, 16),
        ("g4", 2, 8),
        ("side", 4, 4),
    ]
    assert layers["stem.0"].structure_channels[1] == [1, 5]  # g2 reads it with groups=2
    assert layers["g2"].structure_channels[0] == [0, 4, 8, 12]  # GroupNorm(4, 16) and g4's groups=4


def test_hand_counted_params_and_macs_of_a_grouped_net(grouped):
    _, structures = grouped
    assert structures.counts() == (1358, 73336)
    pruned = structures.pruned_vector({"stem.0:0", "g2:0", "g4:0"})
    assert structures.counts(pruned) == (792, 41168)


@pytest.mark.parametrize("spec", [GROUPED, GATED], ids=["grouped", "gated"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_random_masks_prune_physically_with_exact_counts(spec, ratio):
    model = trained_like(spec)
    structures = find_structures(model, X[:1])
    for seed in range(6):
        mask = random_mask(structures, ratio, seed)
        smaller = pruned_copy(model, structures, mask, X[:1])
        summary = mask_summary(structures, mask)
        assert (summary["params_after"], summary["macs_after"]) == (
            count_params(smaller),
            count_macs(smaller, X[:1]),
        )


@pytest.mark.parametrize("spec", [GROUPED, GATED], ids=["grouped", "gated"])
def test_pruning_equals_zeroing_outside_the_approximate_layers(spec):
    model = trained_like(spec)
    structures = find_structures(model, X[:1])
    approximate = approximate_layers(model, structures, X)
    for seed in range(6):
        mask = {k for k in random_mask(structures, 0.5, seed) if k.rpartition(":")[0] not in approximate}
        assert_pruned_equals_zeroed(model, structures, mask)


def test_groupnorm_and_an_affine_free_batchnorm_are_listed_as_approximate():
    grouped_model, gated_model = trained_like(GROUPED), trained_like(GATED)
    grouped = approximate_layers(grouped_model, find_structures(grouped_model, X[:1]), X)
    gated = approximate_layers(gated_model, find_structures(gated_model, X[:1]), X)
    assert list(grouped) == ["g2"] and "gn normalises over several channels" in grouped["g2"]
    assert list(gated) == ["conv2"] and "nonzero value" in gated["conv2"]


def test_the_deviation_of_an_approximate_layer_is_measured():
    model = trained_like(GATED)
    structures = find_structures(model, X[:1])
    assert output_deviation(model, structures, {f"conv2:{c}" for c in range(5)}, X[:1], X) > 1e-3
    assert output_deviation(model, structures, {"se_reduce:1"}, X[:1], X) < 1e-6


def test_zoo_and_user_nets_with_residuals_concat_and_depthwise_are_exact(user_model_spec):
    for spec, shape in (
        ("resnet20", (4, 3, 16, 16)),
        (user_model_spec, (4, 3, 8, 8)),
        ("densenet40", (2, 3, 16, 16)),
    ):
        model = trained_like(spec)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        assert approximate_layers(model, find_structures(model, x[:1]), x) == {}, spec


def test_two_layers_each_feeding_one_group_of_a_grouped_conv_are_pruned_at_equal_positions(tmp_path):
    source = tmp_path / "halves.py"
    source.write_text(
        "import torch\nfrom torch import nn\n"
        "class Halves(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)\n"
        "        self.g, self.head = nn.Conv2d(8, 6, 3, groups=2), nn.Linear(6, 10)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.g(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))\n"
        "def build():\n    return Halves()\n"
    )
    model = build_model(f"{source}:build")
    structures = find_structures(model, X[:1])
    assert [(layer.name, layer.producers, layer.size) for layer in structures.layers] == [
        ("a", ["a", "b"], 4),
        ("g", ["g"], 3),
    ]
    smaller = assert_pruned_equals_zeroed(model.eval(), structures, {"a:1", "a:2"})
    assert smaller.g.in_channels == 4 and smaller.g.weight.shape[1] == 2


def test_kernel_normalisation_weighs_a_residual_stream_by_its_3x3_producers():
    model = build_model("resnet20")
    structures = find_structures(model, torch.randn(1, 3, 16, 16), preset=None)
    stream = next(layer for layer in structures.layers if "layer2.0.shortcut.0" in layer.producers)
    assert 2.5 < stream.kernel < 3.0  # a 1x1 shortcut root, mostly 3x3 in-weights


def test_a_last_batch_of_one_sample_joins_the_previous_batch():
    assert train_mode_batches(21, 10) == [(0, 10), (10, 21)]
    assert train_mode_batches(20, 10) == [(0, 10), (10, 20)]
    assert train_mode_batches(1, 10) == [(0, 1)]


def test_an_at_init_analysis_with_batchnorm1d_and_a_last_batch_of_one_runs():
    wb = open_workbench(ModelSetup(NORM_MLP, "synthetic:3,8,8:10"))
    result = run_analysis(
        wb,
        AnalysisConfig(method="sosp-h", at_init=True, samples=21, batch_size=10),
    )
    assert result.saliency.isfinite().all() and result.n_prunable > 0


def test_hardsigmoid_gets_a_double_backward_during_the_hvp():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Hardsigmoid())
    x = torch.randn(5, 3) * 4
    with twice_differentiable(model):
        (g,) = torch.autograd.grad(model(x).pow(2).sum(), model[0].weight, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), model[0].weight)
    assert h.abs().sum() > 0 and "forward" not in vars(model[1])  # the swap is undone afterwards


def test_analyses_record_their_exactness():
    wb = open_workbench(ModelSetup(GATED, "synthetic:3,8,8:10"))
    result = run_analysis(
        wb,
        AnalysisConfig(method="sosp-h", samples=16, at_init=True),
    )  # BatchNorm statistics re-estimated: not the init ones
    assert result.exactness["exact"] is False and list(result.exactness["approximate_layers"]) == ["conv2"]


def test_timm_models_build_from_their_spec_without_a_download():
    model = build_model("timm:resnet10t", num_classes=7, in_channels=1).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 7) and not is_user_code("timm:resnet10t")


def test_an_unknown_timm_name_is_a_clear_error():
    with pytest.raises(ModelSpecError, match="timm has no model 'resnet_nope'"):
        build_model("timm:resnet_nope")


def test_a_typo_in_a_zoo_name_is_not_user_code():
    assert not is_user_code("resnet21") and is_user_code("my_model.py:build")


ODD = f"{FIXTURE}:build_odd"


def test_a_head_that_runs_only_in_training_has_parameters_but_no_macs():
    model = build_model(ODD).eval()
    structures = find_structures(model, X[:1])
    aux = next(m for m in structures.modules if m.name == "aux")
    assert structures.counts()[0] == count_params(model)
    assert structures.counts()[1] == count_macs(model, X[:1]) and aux.positions == 0


def test_a_conv_that_computes_its_weight_in_forward_is_unprunable_and_counted():
    model = build_model(ODD).eval()
    structures = find_structures(model, X[:1])
    assert "gain" in structures.unprunable["gained"]
    mask = random_mask(structures, 0.5)
    smaller = pruned_copy(model, structures, mask, X[:1])
    assert structures.counts(structures.pruned_vector(mask))[0] == count_params(smaller)


def test_a_split_of_fixed_sizes_is_measured_and_refused_where_a_pruned_net_no_longer_fits_it():
    structures = find_structures(build_model(ODD).eval(), X[:1])
    assert (
        "split" in structures.unprunable["split_source"]
        and "does not run" in structures.unprunable["split_source"]
    )
    assert "split_source" not in [layer.name for layer in structures.layers]


def test_a_pruned_width_the_structures_do_not_predict_is_an_error_not_a_wrong_model(grouped):

    model, structures = grouped
    tampered = dataclasses.replace(structures, removal=structures.removal * 0)
    with pytest.raises(MaskError, match="structures predict"):
        pruned_copy(model, tampered, set(structures.keys[:1]), X[:1])


def test_a_state_dict_without_module_versions_loads_into_a_versioned_module(tmp_path):
    import torchvision

    from sosp_engine.nets import load_weights

    model = torchvision.models.mnasnet0_5(num_classes=10)
    torch.save(
        {k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "plain.pt"
    )  # drops _metadata
    load_weights(torchvision.models.mnasnet0_5(num_classes=10), tmp_path / "plain.pt")


def test_attention_gets_a_double_backward_during_the_hvp():
    from sosp_engine.saliency.common import AnalysisInputs
    from sosp_engine.saliency.sosp_h import sosp_h_terms

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.qkv, self.head = (
                torch.nn.Linear(8, 16),
                torch.nn.Linear(16, 24),
                torch.nn.Linear(8, 3),
            )

        def forward(self, x):
            q, k, v = self.qkv(torch.relu(self.embed(x.flatten(2).transpose(1, 2)))).chunk(3, dim=-1)
            return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v).mean(1))

    model = Attend().eval()
    x = torch.randn(4, 8, 4, 4)
    structures = find_structures(model, x[:1])
    first, second = sosp_h_terms(
        AnalysisInputs(model, structures, x, torch.tensor([0, 1, 2, 0]), "cross-entropy", 4)
    )
    assert torch.isfinite(second).all()


def test_attribution_is_summed_per_structure_of_a_grouped_layer(grouped):
    from sosp_engine.saliency.attribution import channel_attribution, saliency_vs_attribution

    model, structures = grouped
    layer = next(l for l in structures.layers if l.structure_size > 1)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    attribution = channel_attribution(model, structures, layer.name, x, y)
    keys = structures.keys
    frame = saliency_vs_attribution(keys, torch.rand(len(keys)), structures, layer.name, attribution, set())
    assert len(frame) == layer.size and frame.first_order_attribution.sum() == pytest.approx(
        float(attribution.sum())
    )
    assert sorted(frame.sosp_rank) == list(range(1, layer.size + 1))


@pytest.mark.timeout(120)
def test_a_deep_chain_of_sliced_residuals_is_walked_once_per_channel():
    model = trained_like(
        SLICED
    )  # 12 blocks: torch-pruning's own search takes about 100 s at 8 and doubles per block
    structures = find_structures(model, X[:1])
    assert [layer.name for layer in structures.layers] == ["stem"] + [f"blocks.{i}.0" for i in range(12)]
    assert (
        "blocks.11.3" in structures.layers[0].producers
    )  # the sliced adds join every block's output to the stream
    assert_pruned_equals_zeroed(model, structures, random_mask(structures, 0.5, seed=3))


def test_channels_a_depthwise_conv_copies_into_a_concatenation_are_one_structure():
    model = trained_like(GHOST)
    structures = find_structures(model, X[:1])
    layer = next(layer for layer in structures.layers if "primary.0" in layer.producers)
    assert layer.size == 6 and {"cheap.0", "dw.0"} <= set(layer.producers)
    dw = next(piece for piece in structures.producers if piece.module == "dw.0")
    held = {s: sorted(dw.channels[dw.structure == s].tolist()) for s in dw.structure.unique().tolist()}
    assert sorted(held.values()) == [[c, c + 6] for c in range(6)]


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_random_masks_of_a_ghost_module_prune_physically_and_equal_zeroing(ratio):
    model = trained_like(GHOST)
    structures = find_structures(model, X[:1])
    for seed in range(6):
        mask = random_mask(structures, ratio, seed)
        smaller = assert_pruned_equals_zeroed(model, structures, mask)
        summary = mask_summary(structures, mask)
        assert (summary["params_after"], summary["macs_after"]) == (
            count_params(smaller),
            count_macs(smaller, X[:1]),
        )


def test_channels_a_hard_coded_reshape_folds_together_are_unprunable_with_what_was_measured():
    model = trained_like(SK)
    structures = find_structures(model, X[:1])
    assert "sizes the graph fixes" in structures.unprunable["paths.0.0"]
    assert "does not run" in structures.unprunable["paths.0.0"]
    assert all(not name.startswith(("paths", "fc_select")) for name in (l.name for l in structures.layers))
    assert_pruned_equals_zeroed(model, structures, random_mask(structures, 0.5, seed=1))
