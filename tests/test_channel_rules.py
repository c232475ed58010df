"""One wiring class per test, each against a hand-declared answer (which channels go together, what the pruned
modules keep) and a float64 check that the physically pruned net equals the zero-masked one, with exact counts."""

import torch
from torch import nn
from torch.nn import functional as F

from sosp_engine.pruning.channel_rules import broadcast_labels, matmul_labels
from sosp_engine.pruning.counting import count_macs, count_params
from sosp_engine.pruning.exactness import exactness_report
from sosp_engine.pruning.masks import pruned_copy
from sosp_engine.pruning.offered import find_structures

D = 3


def offered(net: nn.Module, channels: int = 2, size: int = 8, depth: int | None = None):
    torch.manual_seed(0)
    model = net.double().eval()
    shape = (4, channels, size, size) if depth is None else (4, channels, depth, size, size)
    x = torch.randn(*shape, dtype=torch.float64)
    return model, find_structures(model, x[:1]), x


def layer(structures, name):
    return next(l for l in structures.layers if l.name == name)


def assert_pruned_as_zeroed(model, structures, mask, x) -> nn.Module:
    """Exact in float64, and the structures' counts equal the pruned net's own."""
    report = exactness_report(model, structures, mask, x[:1], x)
    assert report["exact"], report
    smaller = pruned_copy(model, structures, mask, x[:1])
    params, macs = structures.counts(structures.pruned_vector(mask))
    assert (params, macs) == (count_params(smaller), count_macs(smaller, x[:1]))
    return smaller


class Res2Block(nn.Module):
    """Res2Net: a 1x1 conv split in 4, chunk i takes conv(chunk_i + out_{i-1}), concat, 1x1 conv, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 8, 1)
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 3, padding=1) for _ in range(3))
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, D)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        chunks = torch.chunk(torch.relu(self.conv1(h)), 4, 1)
        outs, previous = [chunks[0]], None
        for chunk, conv in zip(chunks[1:], self.convs):
            previous = torch.relu(conv(chunk if previous is None else chunk + previous))
            outs.append(previous)
        return self.head(torch.relu(self.conv3(torch.cat(outs, 1)) + h).mean((2, 3)))


def test_a_hierarchical_split_keeps_its_chunks_equal_and_its_last_branch_prunable():
    model, structures, x = offered(Res2Block())
    split = layer(structures, "conv1")
    assert split.producers == ["conv1", "convs.0", "convs.1"] and split.structure_channels == [
        [0, 2, 4, 6],
        [1, 3, 5, 7],
    ]
    assert layer(structures, "convs.2").size == 2 and set(layer(structures, "stem").producers) == {
        "stem",
        "conv3",
    }
    smaller = assert_pruned_as_zeroed(model, structures, {"conv1:1", "convs.2:0"}, x)
    assert (smaller.conv1.out_channels, smaller.convs[0].in_channels, smaller.conv3.in_channels) == (4, 1, 4)


class Fusion(nn.Module):
    """HRNet: two resolutions exchange features (an upsampled 1x1 conv into the high one, a strided 3x3 into the low)."""

    def __init__(self) -> None:
        super().__init__()
        self.high, self.low = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.low_to_high, self.high_to_low = nn.Conv2d(6, 4, 1), nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(10, D)

    def forward(self, x):
        high, low = torch.relu(self.high(x)), torch.relu(self.low(x))
        high, low = (
            high + F.interpolate(self.low_to_high(low), scale_factor=2.0, mode="nearest"),
            low + self.high_to_low(high),
        )
        return self.head(torch.cat([high.mean((2, 3)), low.mean((2, 3))], 1))


def test_a_fusion_of_two_resolutions_couples_each_stream_with_what_is_added_to_it():
    model, structures, x = offered(Fusion())
    assert layer(structures, "high").producers == ["high", "low_to_high"]
    assert layer(structures, "low").producers == ["low", "high_to_low"]
    smaller = assert_pruned_as_zeroed(model, structures, {"high:0", "low:5"}, x)
    assert (smaller.low_to_high.out_channels, smaller.high_to_low.in_channels, smaller.head.in_features) == (
        3,
        3,
        8,
    )


class FlattenIntoLinear(nn.Module):
    """VGG's classifier: C x H x W flattened into one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.head = nn.Linear(3 * 4 * 4, D)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_a_channel_flattened_into_a_linear_layer_takes_its_positions_with_it():
    model, structures, x = offered(FlattenIntoLinear())
    assert layer(structures, "conv").size == 3
    consumed = next(p for p in structures.consumed if p.module == "head")
    assert consumed.channels[consumed.structure == 1].tolist() == list(range(16, 32))
    smaller = assert_pruned_as_zeroed(model, structures, {"conv:1"}, x)
    assert smaller.head.in_features == 32


class LinearSE(nn.Module):
    """Squeeze-and-excitation with linear layers: the excitation's outputs gate the stream channel by channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(6, 3), nn.Linear(3, 6)
        self.head = nn.Linear(6, D)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3))))))
        return self.head((h * gate[:, :, None, None]).mean((2, 3)))


def test_a_linear_excitation_is_pruned_with_the_channels_it_gates():
    model, structures, x = offered(LinearSE())
    assert layer(structures, "conv").producers == ["conv", "fc2"] and layer(structures, "fc1").size == 3
    smaller = assert_pruned_as_zeroed(model, structures, {"conv:2", "fc1:0"}, x)
    assert (smaller.fc2.out_features, smaller.fc1.in_features, smaller.fc2.in_features) == (5, 5, 2)


class FeatureMapAttention(nn.Module):
    """Self-attention written by hand on a feature map: q, k, v 1x1 convs, `num_heads` heads, softmax(q k / sqrt d) v."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.q, self.k, self.v = (nn.Conv2d(6, 8, 1) for _ in range(3))
        self.proj = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, D)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        b, _, height, width = h.shape
        q, k, v = (
            t.reshape(b, self.num_heads, -1, height * width) for t in (self.q(h), self.k(h), self.v(h))
        )
        attn = torch.softmax(q.transpose(-1, -2) @ k / 2.0, -1)
        out = (v @ attn.transpose(-1, -2)).reshape(b, -1, height, width)
        return self.head((h + self.proj(out)).mean((2, 3)))


def test_attention_written_by_hand_offers_whole_heads_and_prunes_them_with_the_head_count():
    model, structures, x = offered(FeatureMapAttention(), size=4)
    heads = layer(structures, "q")
    assert heads.producers == ["q", "k", "v"] and heads.size == 2
    assert structures.heads == {"": [structures.key_index()["q:0"], structures.key_index()["q:1"]]}
    smaller = assert_pruned_as_zeroed(model, structures, {"q:1"}, x)
    assert smaller.num_heads == 1 and smaller.proj.in_channels == 4


class GLU(nn.Module):
    """A gated linear unit: a conv to 2C, halves a and b, a * sigmoid(b)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.out = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, D)

    def forward(self, x):
        a, b = torch.chunk(self.conv(x), 2, 1)
        return self.head(torch.relu(self.out(a * torch.sigmoid(b))).mean((2, 3)))


def test_a_gated_linear_unit_pairs_channel_j_with_channel_j_plus_c():
    model, structures, x = offered(GLU())
    assert layer(structures, "conv").structure_channels == [[0, 3], [1, 4], [2, 5]]
    smaller = assert_pruned_as_zeroed(model, structures, {"conv:0"}, x)
    assert (smaller.conv.out_channels, smaller.out.in_channels) == (4, 2)


class DepthwiseMultiplier(nn.Module):
    """A stem into a depthwise conv with channel multiplier 2 (stem channel c feeds outputs 2c and 2c + 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.dw = nn.Conv2d(3, 6, 3, padding=1, groups=3)
        self.pw = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, D)

    def forward(self, x):
        return self.head(torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))).mean((2, 3)))


def test_a_depthwise_multiplier_prunes_a_stem_channel_with_its_two_outputs():
    model, structures, x = offered(DepthwiseMultiplier())
    assert layer(structures, "stem").producers == ["stem", "dw"] and layer(structures, "stem").size == 3
    dw = next(p for p in structures.producers if p.module == "dw")
    assert dw.channels[dw.structure == dw.structure[2]].tolist() == [2, 3]
    smaller = assert_pruned_as_zeroed(model, structures, {"stem:1"}, x)
    assert (smaller.dw.in_channels, smaller.dw.out_channels, smaller.dw.groups, smaller.pw.in_channels) == (
        2,
        4,
        2,
        4,
    )


class ScaledInstanceNorm(nn.Module):
    """A residual branch with an affine InstanceNorm and a layer scale (a bare per-channel parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True)
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 4).reshape(4, 1, 1))
        self.head = nn.Linear(4, D)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head((h + self.gamma * self.norm(self.conv(h))).mean((2, 3)))


def test_a_layer_scale_and_an_instance_norm_are_cut_with_the_stream():
    model, structures, x = offered(ScaledInstanceNorm())
    assert layer(structures, "stem").producers == ["stem", "conv", "norm"]
    assert structures.parameter_axes == {"gamma": 0}
    smaller = assert_pruned_as_zeroed(model, structures, {"stem:2"}, x)
    assert smaller.gamma.shape == (3, 1, 1) and smaller.norm.weight.shape == (3,)


class SelfConcat(nn.Module):
    """A tensor concatenated with itself: conv channel c reaches the consumer's inputs c and c + C."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.out = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, D)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.head(torch.relu(self.out(torch.cat([h, h], 1))).mean((2, 3)))


def test_a_tensor_concatenated_with_itself_removes_both_copies_of_a_channel():
    model, structures, x = offered(SelfConcat())
    consumed = next(p for p in structures.consumed if p.module == "out")
    assert consumed.channels[consumed.structure == 0].tolist() == [0, 3]
    smaller = assert_pruned_as_zeroed(model, structures, {"conv:0"}, x)
    assert smaller.out.in_channels == 4


class Volume(nn.Module):
    """3-d convolutions with a BatchNorm3d (video, medical volumes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm3d(4)
        self.out = nn.Conv3d(4, 3, 1)
        self.head = nn.Linear(3, D)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        return self.head(torch.relu(self.out(h)).mean((2, 3, 4)))


def test_3d_convolutions_prune_like_2d_ones():
    model, structures, x = offered(Volume(), size=4, depth=4)
    assert layer(structures, "conv").producers == ["conv", "norm"] and layer(structures, "conv").size == 4
    smaller = assert_pruned_as_zeroed(model, structures, {"conv:3", "out:0"}, x)
    assert (smaller.conv.out_channels, smaller.norm.num_features, smaller.out.in_channels) == (3, 3, 3)


class Windows(nn.Module):
    """Swin's window partition: C stays its own axis while positions are cut into windows and back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, D)

    def forward(self, x):
        h = torch.relu(self.stem(x)).permute(0, 2, 3, 1)  # B, H, W, C
        b, height, width, c = h.shape
        windows = h.view(b, height // 2, 2, width // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        mixed = torch.relu(self.mix(windows)).view(b, height // 2, width // 2, 2, 2, c)
        back = mixed.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)
        return self.head((h + back).mean((1, 2)))


def test_a_window_partition_keeps_channels_on_their_own_axis():
    model, structures, x = offered(Windows(), size=4)
    assert layer(structures, "stem").producers == ["stem", "mix"] and layer(structures, "stem").size == 4
    smaller = assert_pruned_as_zeroed(model, structures, {"stem:1", "stem:2"}, x)
    assert smaller.mix.in_features == smaller.mix.out_features == 2


class Recorder:
    """A Coupling that records what a rule couples (the tracer's own is tested through the nets above)."""

    def __init__(self) -> None:
        self.pairs, self.blocked, self.head_ids = [], [], []

    def couple(self, labels):
        for a, b in zip(labels[0].flatten().tolist(), labels[1].flatten().tolist()):
            if a >= 0 and b >= 0 and a != b:
                self.pairs.append((int(a), int(b)))

    def couple_within(self, labels, dim):
        for row in labels.movedim(dim, 0).reshape(labels.shape[dim], -1):
            ids = sorted({int(v) for v in row.tolist() if v >= 0})
            self.pairs += [(ids[0], other) for other in ids[1:]]

    def block(self, labels, why):
        self.blocked.append(why)

    def heads(self, ids):
        self.head_ids.append(ids)


def test_a_gate_broadcast_over_the_channel_axis_couples_nothing_and_passes_the_stream_ids_on():
    recorder = Recorder()
    stream = torch.arange(4.0).reshape(1, 4, 1, 1).expand(1, 4, 2, 2)
    gate = torch.full((1, 1, 2, 2), 9.0)
    out = broadcast_labels(recorder, [stream, gate], torch.Size((1, 4, 2, 2)))
    assert recorder.pairs == [] and torch.equal(out, stream)


def _groups(pairs) -> list[set[int]]:
    groups: list[set[int]] = []
    for a, b in pairs:
        joined = [g for g in groups if a in g or b in g]
        merged = {a, b}.union(*joined)
        groups = [g for g in groups if g not in joined] + [merged]
    return sorted(groups, key=min)


def test_a_matmul_over_heads_keeps_each_head_of_q_and_k_whole():
    recorder = Recorder()
    q = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 2, 1, 2).expand(1, 2, 3, 2)  # (B, heads, N, d)
    k = q + 10
    matmul_labels(recorder, q, k.transpose(-1, -2))
    assert _groups(recorder.pairs) == [{0, 1, 10, 11}, {2, 3, 12, 13}] and len(recorder.head_ids) == 1


def test_a_matmul_of_one_head_pairs_q_and_k_channel_by_channel():
    recorder = Recorder()
    q = torch.arange(4.0).reshape(1, 1, 4).expand(1, 3, 4)  # (B, N, C)
    matmul_labels(recorder, q, (q + 10).transpose(-1, -2))
    assert _groups(recorder.pairs) == [{0, 10}, {1, 11}, {2, 12}, {3, 13}] and recorder.head_ids == []


def test_a_timm_vit_offers_whole_attention_heads_that_prune_exactly():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=D)
    vit = vit.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    structures = find_structures(vit, x[:1])
    assert {name: len(heads) for name, heads in structures.heads.items()} == {
        "blocks.0.attn": 3,
        "blocks.1.attn": 3,
    }
    mask = {structures.keys[structures.heads["blocks.1.attn"][0]]}
    smaller = pruned_copy(vit, structures, mask, x[:1])
    assert smaller.blocks[1].attn.num_heads == 2 and smaller.blocks[1].attn.qkv.out_features == 3 * 2 * 64
    report = exactness_report(vit, structures, mask, x[:1], x)
    assert (
        report["deviation"] <= report["tolerance"]
    )  # the heads' own deviation: none (the stream's norms mix)
