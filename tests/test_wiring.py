"""Exact or refused on any wiring: modules called several times, transposed convolutions, channel splits and
permutations. Counts follow every call; saliencies equal a float64 brute force; "exact" is a measurement."""

import copy

import pytest
import torch
from torch import nn
from torch.func import jacrev

from brute_force import flat, mean_loss_of, theta_s_vectors, unflat
from sosp_engine.pruning.counting import count_macs, count_params
from sosp_engine.pruning.exactness import EXACTNESS_SAMPLES, exactness_line, exactness_report
from sosp_engine.pruning.masks import pruned_copy
from sosp_engine.pruning.offered import find_structures
from sosp_engine.saliency.common import AnalysisInputs
from sosp_engine.saliency.sosp_h import sosp_h_terms
from sosp_engine.saliency.sosp_i import gauss_newton_terms

N, D = 5, 3


class ReusedBlock(nn.Module):
    """One conv applied twice, at one resolution or (with `pool`) at two; the second call is a residual block."""

    def __init__(self, pool: bool = False) -> None:
        super().__init__()
        self.pool = pool
        self.conv0 = nn.Conv2d(2, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.hidden = nn.Conv2d(4, 3, 1)
        self.head = nn.Linear(3, D)

    def forward(self, x):
        h = torch.tanh(self.conv0(x))
        h = torch.tanh(self.block(h))
        if self.pool:
            h = nn.functional.avg_pool2d(h, 2)
        h = torch.tanh(self.block(h) + h)
        return self.head(torch.tanh(self.hidden(h)).mean((2, 3)))


class Decoder(nn.Module):
    """A U-Net-like upsampling: conv -> transposed conv -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.out = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Linear(5, D)

    def forward(self, x):
        h = torch.relu(self.up(torch.relu(self.down(x))))
        return self.head(torch.relu(self.out(h)).mean((2, 3)))


class NormedDecoder(Decoder):
    """The decoder with an eval-mode BatchNorm after the transposed conv (as U-Net decoders have)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, bias=False)
        self.norm = nn.BatchNorm2d(4)
        torch.manual_seed(1)
        self.norm.running_mean.uniform_(-1, 1)
        self.norm.running_var.uniform_(0.5, 2)
        nn.init.uniform_(self.norm.weight, 0.5, 2)

    def forward(self, x):
        h = torch.relu(self.norm(self.up(torch.relu(self.down(x)))))
        return self.head(torch.relu(self.out(h)).mean((2, 3)))


class Split(nn.Module):
    """The channel axis split in two halves that go different ways."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.left = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(6, D)

    def forward(self, x):
        a, b = torch.chunk(torch.relu(self.conv(x)), 2, dim=1)
        return self.head(torch.cat([torch.relu(self.left(a)), b], 1).mean((2, 3)))


class Shuffle(nn.Module):
    """Grouped conv -> channel shuffle -> grouped conv (ShuffleNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(2, 8, 3, padding=1)
        self.g1 = nn.Conv2d(8, 8, 1, groups=2)
        self.g2 = nn.Conv2d(8, 8, 1, groups=2)
        self.head = nn.Linear(8, D)

    def forward(self, x):
        h = torch.relu(self.g1(torch.relu(self.conv0(x))))
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        return self.head(torch.relu(self.g2(h)).mean((2, 3)))


class TwoConvs(nn.Module):
    """conv0 -> an op on the channel axis (`between`) -> conv1 -> head."""

    def __init__(self, width: int = 6, consumed: int = 6) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(2, width, 3, padding=1)
        self.conv1 = nn.Conv2d(consumed, 5, 1)
        self.head = nn.Linear(5, D)

    def between(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        h = self.between(torch.relu(self.conv0(x)))
        return self.head(torch.relu(self.conv1(h)).mean((2, 3)))


class ShuffleIntoPlainConv(TwoConvs):
    """A shuffle of 3 groups hard-coded in a reshape, before a plain conv: a pruned tensor no longer fits it."""

    def between(self, h):
        n, c, hh, ww = h.shape
        return h.view(n, 3, 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)


class Flip(TwoConvs):
    """The channel order reversed between two convs."""

    def between(self, h):
        return torch.flip(h, [1])


class PixelShuffle(TwoConvs):
    """Channels moved into space (sub-pixel upsampling) before a conv."""

    def __init__(self) -> None:
        super().__init__(width=8, consumed=2)

    def between(self, h):
        return nn.functional.pixel_shuffle(h, 2)


class ChannelMean(TwoConvs):
    """Each channel gated by the mean over channels: removing a channel changes the others."""

    def between(self, h):
        return h * torch.sigmoid(h.mean(1, keepdim=True))


def tiny(net: nn.Module, size: int = 6):
    torch.manual_seed(0)
    model = net.double().eval()
    x = torch.randn(N, 2, size, size, dtype=torch.float64)
    return model, find_structures(model, x[:1]), x, torch.randint(0, D, (N,))


def macs_by_hand(model: nn.Module, x: torch.Tensor) -> int:
    """Every call of every conv / transposed conv / linear, counted from its real input and output."""
    total = [0]

    def hook(m, args, out):
        if isinstance(m, nn.ConvTranspose2d):
            positions = args[0].shape[2] * args[0].shape[3]
        elif isinstance(m, nn.Conv2d):
            positions = out.shape[2] * out.shape[3]
        else:
            positions = 1
        weight = m.weight.numel()
        total[0] += weight * positions

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return total[0]


# --- counts follow every call of every module ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "net", [ReusedBlock(), ReusedBlock(pool=True), Decoder()], ids=["reuse", "reuse-2res", "transposed"]
)
def test_macs_count_every_call_of_every_module(net):
    model, structures, x, _ = tiny(net)
    assert count_macs(model, x) == macs_by_hand(model, x)
    assert structures.counts()[1] == macs_by_hand(model, x)
    assert structures.counts()[0] == count_params(model)


@pytest.mark.parametrize(
    "net", [ReusedBlock(), ReusedBlock(pool=True), Decoder()], ids=["reuse", "reuse-2res", "transposed"]
)
def test_predicted_counts_of_a_mask_equal_the_counts_of_the_pruned_net(net):
    model, structures, x, _ = tiny(net)
    mask = {key for key in structures.keys if key.endswith(":0") or key.endswith(":1")}
    smaller = pruned_copy(model, structures, mask, x[:1])
    predicted = structures.counts(structures.pruned_vector(mask))
    assert predicted == (count_params(smaller), macs_by_hand(smaller, x))


def test_a_transposed_convolutions_output_channels_are_structures_and_its_inputs_go_with_its_feeder():
    _, structures, _, _ = tiny(Decoder())
    assert [layer.name for layer in structures.layers] == ["down", "up", "out"]
    assert "up" in structures.layers[0].consumers and structures.layers[1].producers == ["up"]
    assert "up" not in structures.unprunable


def test_a_grouped_transposed_convolution_is_listed_as_not_offered_with_the_reason():
    model = Decoder()
    model.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
    _, structures, _, _ = tiny(model)
    assert "up" in structures.unprunable and "grouped transposed" in structures.unprunable["up"]


# --- saliencies equal the brute force where modules are called several times or transposed ----------------------------
WIRED = {
    "one-resolution": lambda: ReusedBlock(),
    "two-resolutions": lambda: ReusedBlock(True),
    "transposed": Decoder,
    "transposed-batchnorm": NormedDecoder,
}


@pytest.mark.parametrize("net", list(WIRED))
def test_sosp_h_equals_the_explicit_hessian_on_reused_and_transposed_producers(net):
    model, structures, x, y = tiny(WIRED[net]())
    theta = flat(model, dict(model.named_parameters())).detach()
    hessian = torch.autograd.functional.hessian(mean_loss_of(model, x, y, "cross-entropy"), theta)
    thetas = torch.stack([flat(model, v) for v in theta_s_vectors(model, structures)])
    first, second = sosp_h_terms(AnalysisInputs(model, structures, x, y, "cross-entropy", 2))
    torch.testing.assert_close(second, thetas @ (hessian @ thetas.sum(0)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("net", list(WIRED))
def test_sosp_i_equals_explicit_jacobians_on_reused_and_transposed_producers(net):
    model, structures, x, y = tiny(WIRED[net]())
    theta = flat(model, dict(model.named_parameters())).detach()
    thetas = torch.stack([flat(model, v) for v in theta_s_vectors(model, structures)])
    expected = torch.zeros(structures.num_structures, structures.num_structures, dtype=torch.float64)
    for n in range(N):
        f = lambda t: torch.func.functional_call(model, unflat(model, t), (x[n : n + 1],))[0]  # noqa: E731
        p = torch.softmax(f(theta).detach(), 0)
        phi_theta = jacrev(f)(theta) @ thetas.T
        expected += phi_theta.T @ (torch.diag(p) - torch.outer(p, p)) @ phi_theta
    _, gram = gauss_newton_terms(AnalysisInputs(model, structures, x, y, "cross-entropy", 2))
    torch.testing.assert_close(gram, expected / N, rtol=1e-9, atol=1e-12)


# --- refusals name the real cause ---------------------------------------------------------------------------------------
def test_a_channel_axis_chunked_in_two_halves_is_pruned_at_one_position_of_both_halves_exactly():
    model, structures, x, _ = tiny(Split())
    assert structures.layers[0].name == "conv" and structures.layers[0].consumers == ["head", "left"]
    assert structures.layers[0].structure_channels == [[0, 3], [1, 4], [2, 5]]  # the halves stay equal
    report = exactness_report(model, structures, {"conv:1"}, x[:1], x)
    assert report["exact"]


# --- "exact" is a measurement ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "net",
    [ReusedBlock(), ReusedBlock(pool=True), Decoder(), NormedDecoder()],
    ids=["reuse", "reuse-2res", "transposed", "transposed-batchnorm"],
)
def test_nets_whose_pruning_equals_zeroing_are_measured_exact(net):
    model, structures, x, _ = tiny(net)
    report = exactness_report(model, structures, set(structures.keys[:1]), x[:1], x)
    assert report["exact"] and report["largest_deviation"] <= report["tolerance"] and report["masks"] == 2


@pytest.mark.parametrize(
    "net",
    [ReusedBlock(), ReusedBlock(pool=True), Decoder(), NormedDecoder(), Shuffle(), Flip()],
    ids=["reuse", "reuse-2res", "transposed", "transposed-batchnorm", "shuffle", "flip"],
)
def test_a_wrong_routing_is_caught_on_the_few_samples_the_check_measures(net):
    model, structures, x, _ = tiny(net)
    misrouted = copy.deepcopy(
        structures
    )  # every consumer removes its structures' input channels in reverse order
    for piece in misrouted.consumed:
        piece.channels = piece.channels.flip(0)
    many = torch.cat([x] * 8)  # more samples than the check takes
    report = exactness_report(model, misrouted, set(structures.keys[:1]), x[:1], many)
    assert report["samples"] == EXACTNESS_SAMPLES < len(many)
    assert not report["exact"] and report["approximate_layers"]


def test_a_channel_shuffle_between_grouped_convs_is_offered_as_the_closure_of_both_groupings():
    _, structures, _, _ = tiny(Shuffle())
    assert structures.layers[1].name == "g1"
    assert structures.layers[1].structure_channels == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("net", [Shuffle, Flip], ids=["shuffle", "flip"])
def test_channels_reordered_on_the_way_are_pruned_exactly(net):
    model, structures, x, _ = tiny(net())
    report = exactness_report(model, structures, set(structures.keys[:1]), x[:1], x)
    assert report["exact"] and report["largest_deviation"] <= report["tolerance"]


def test_a_shuffle_a_pruned_net_cannot_follow_is_refused_with_what_was_measured():
    _, structures, _, _ = tiny(ShuffleIntoPlainConv())
    assert [layer.name for layer in structures.layers] == ["conv1"]
    assert "sizes the graph fixes" in structures.unprunable["conv0"]
    assert "does not run" in structures.unprunable["conv0"]


def test_channels_moved_into_space_are_pruned_as_the_groups_one_output_channel_gathers():
    model, structures, x, _ = tiny(PixelShuffle())
    assert structures.layers[0].structure_channels == [[0, 1, 2, 3], [4, 5, 6, 7]]
    report = exactness_report(model, structures, {"conv0:1"}, x[:1], x)
    assert report["exact"]


def test_a_layer_whose_removal_changes_the_other_channels_is_measured_approximate():
    model, structures, x, _ = tiny(ChannelMean())
    report = exactness_report(model, structures, set(structures.keys[:1]), x[:1], x)
    assert report["deviation"] > report["tolerance"] and not report["exact"]
    assert list(report["approximate_layers"]) == ["conv0"]
    assert exactness_line(report).startswith("approximate in 1 layers: conv0")


def test_sosp_h_equals_the_explicit_hessian_through_a_channel_shuffle():
    model, structures, x, y = tiny(Shuffle())
    theta = flat(model, dict(model.named_parameters())).detach()
    hessian = torch.autograd.functional.hessian(mean_loss_of(model, x, y, "cross-entropy"), theta)
    thetas = torch.stack([flat(model, v) for v in theta_s_vectors(model, structures)])
    _, second = sosp_h_terms(AnalysisInputs(model, structures, x, y, "cross-entropy", 2))
    torch.testing.assert_close(second, thetas @ (hessian @ thetas.sum(0)), rtol=1e-9, atol=1e-12)


def test_a_float32_net_is_measured_in_float64():
    model, structures, x, _ = tiny(ReusedBlock())
    model = model.float()
    report = exactness_report(model, structures, set(structures.keys[:1]), x[:1].float(), x.float())
    assert report["precision"] == "float64" and report["exact"]
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


@pytest.mark.parametrize("net", list(WIRED))
def test_every_method_runs_on_reused_and_transposed_producers(net):
    from sosp_engine.saliency.analysis import AnalysisOptions, compute_saliency
    from sosp_engine.saliency.methods import METHODS
    from sosp_engine.saliency.homogeneity import not_scaling

    model, structures, x, y = tiny(WIRED[net]())
    inputs = AnalysisInputs(model, structures, x, y, "cross-entropy", 2)
    assert not_scaling(inputs) == []
    for method in METHODS:
        ranking = compute_saliency(inputs, AnalysisOptions(method=method), "none")
        assert torch.isfinite(ranking.saliency).all(), method
