"""Per-layer latency costs measured on a device: the seconds each input and output channel of each conv, linear and
norm takes at a batch size, so that a pruning order can rank structures by saliency per second saved
(`normalize="latency"`)."""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import AnalysisError, ModelSpecError
from ..nets.onnx_export import ExportError
from .profile import LatencyTiming, Timing, timed_rounds
from .runtimes import EAGER, check_runtime, forward_call, runtime_label
from ..progress import ProgressFn, StopFn, check_cancel, report
from ..pruning.structures import channel_dim
from ..pruning.structures import StructureSet, on_model_device, preserved_modes
from ..pruning.surgery import resized_module

MEASURED_KINDS = ("conv", "depthwise", "linear", "norm")
# a structure's cost is at least this share of the mean cost: a slope lost in timing noise never makes it free
COST_FLOOR_SHARE = 0.01
NOISE_SIGMAS = 2.0  # a narrower module's time counts as different only beyond this many standard errors


@dataclass
class LayerLatency:
    """Measured seconds per channel of each module dimension (the columns of `StructureSet.removal`: 2 i for module
    i's input channels, 2 i + 1 for its output channels), at one batch size on one device.

    Each slope is the time saved by halving that dimension alone (the module timed alone, alternately at full and at
    half width), divided by the channels removed; 0 where the difference is within the timing noise, and for modules of
    other kinds or that cannot be rebuilt narrower (`unmeasured`).
    """

    device: str
    batch: int
    threads: int
    modules: list[str]
    seconds: list[float]  # each module's forward alone at full width
    per_channel: list[float]
    unmeasured: list[str] = field(default_factory=list)
    timed_dimensions: int = 0  # channel dimensions timed narrower; those with a nonzero slope were resolved
    runtime: str = EAGER

    def describe(self) -> str:
        """One line for the user: where and how the layers were timed, and how many costs rose above the noise."""
        resolved = sum(1 for v in self.per_channel if v)
        line = (
            f"layer latencies in {runtime_label(self.runtime, self.device)} at batch {self.batch} "
            f"({self.threads} threads): {resolved} of "
            f"{self.timed_dimensions} channel dimensions resolved above the timing noise"
        )
        if self.unmeasured:
            line += f"; {len(self.unmeasured)} layers not timed (e.g. {self.unmeasured[0]})"
        return line

    def structure_seconds(self, structures: StructureSet) -> torch.Tensor:
        """Seconds saved by pruning each structure alone, floored at a hundredth of the mean (never 0 or negative:
        a structure whose removal measured slower ranks last)."""
        if [m.name for m in structures.modules] != self.modules:
            raise ModelSpecError("this layer latency table was measured on another model's layers")
        if not any(self.per_channel):
            raise AnalysisError(
                f"timing each layer on {self.device} at batch {self.batch} resolved no channel's cost "
                "above the timing noise (a GPU at a small batch is bound by kernel launches): use a "
                "larger latency batch, or normalise by MACs"
            )
        saved = structures.removal @ torch.tensor(self.per_channel, dtype=torch.float64)
        positive = saved[saved > 0]
        floor = COST_FLOOR_SHARE * float(positive.mean()) if len(positive) else 1e-12
        return saved.clamp(min=floor)


def _input_shapes(model: nn.Module, names: set[str], example: torch.Tensor) -> dict[str, tuple]:
    """Each named module's first input shape in one eval forward of `example`."""
    shapes: dict[str, tuple] = {}

    def hook(module, args, name):
        if args and isinstance(args[0], torch.Tensor):
            shapes.setdefault(name, tuple(args[0].shape))

    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=n: hook(mod, args, name))
        for n, m in model.named_modules()
        if n in names
    ]
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            model(on_model_device(model, example))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _narrower(channels: int, multiple: int) -> int | None:
    """About half of `channels`, a multiple of `multiple` (grouped convs, GroupNorm), or None if none is smaller."""
    half = (channels // 2) // multiple * multiple
    return half if 0 < half < channels else None


def _variants(
    module: nn.Module, in_channels: int, out_channels: int, kind: str, pruned: tuple[bool, bool]
) -> list[tuple[int, int, nn.Module, int]]:
    """(dimension 0 = in / 1 = out, channels removed, narrower module, its input channels) for each dimension that
    some structure narrows (`pruned`: in, out)."""
    if kind in ("depthwise", "norm"):
        multiple = module.num_groups if isinstance(module, nn.GroupNorm) else 1
        half = _narrower(out_channels, multiple) if any(pruned) else None
        return [] if half is None else [(1, out_channels - half, resized_module(module, half, half), half)]
    groups = getattr(module, "groups", 1)
    out = []
    half = _narrower(in_channels, groups) if pruned[0] else None
    if half is not None:
        out.append((0, in_channels - half, resized_module(module, half, out_channels), half))
    half = _narrower(out_channels, groups) if pruned[1] else None
    if half is not None:
        out.append((1, out_channels - half, resized_module(module, in_channels, half), in_channels))
    return out


def _runs(modules: list[nn.Module], inputs: list[torch.Tensor]) -> bool:
    """Whether each module takes its input (a subclass rebuilt as its plain base class may not, e.g. a LayerNorm over
    NCHW channels)."""
    try:
        with torch.no_grad():
            for module, x in zip(modules, inputs):
                module(x)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def saved_per_channel(full: list[float], narrower: list[float], removed: int) -> float:
    """Seconds saved per removed channel, or 0 where the two timings differ by less than their noise (NOISE_SIGMAS
    standard errors): an unresolved slope must not rank structures by chance."""
    a, b = Timing(full), Timing(narrower)
    if abs(a.median - b.median) <= NOISE_SIGMAS * math.hypot(a.standard_error, b.standard_error):
        return 0.0
    return (a.median - b.median) / removed


LAYER_TIMING = LatencyTiming(warmup=2)  # each layer alone, on the CPU at batch 1


def measure_layer_latency(
    model: nn.Module,
    structures: StructureSet,
    example: torch.Tensor,
    timing: LatencyTiming = LAYER_TIMING,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> LayerLatency:
    """Time every conv, linear and norm that a structure narrows alone as `timing` says, at full width and with each
    such channel dimension halved, and keep the seconds per channel. (ONNX Runtime folds a BatchNorm into the conv
    before it in a whole net; timed alone, the norm keeps a cost it would not have there.)"""
    runtime, batch = check_runtime(timing.runtime), timing.batch
    device = torch.device(timing.device)
    modules = dict(model.named_modules())
    shapes = _input_shapes(model, {m.name for m in structures.modules}, example[:1])
    seconds = [0.0] * len(structures.modules)
    per_channel = [0.0] * (2 * len(structures.modules))
    unmeasured, timed = [], 0
    pruned = (structures.removal != 0).any(0).tolist()
    for i, info in enumerate(structures.modules):
        check_cancel(should_stop)
        report(progress, i / len(structures.modules), f"timing {info.name} alone")
        if info.kind not in MEASURED_KINDS or not (pruned[2 * i] or pruned[2 * i + 1]):
            continue
        shape = shapes.get(info.name)
        module = modules[info.name]
        try:
            variants = (
                _variants(
                    module, info.in_channels, info.out_channels, info.kind, (pruned[2 * i], pruned[2 * i + 1])
                )
                if shape
                else None
            )
        except ModelSpecError:
            variants = None
        dtype = next(module.parameters(), torch.empty(0)).dtype
        full = torch.randn(batch, *shape[1:], device=device, dtype=dtype) if shape else None
        nets, inputs = [copy.deepcopy(module).eval().to(device)], [full]
        for _, _, narrower, channels in variants or []:
            nets.append(narrower.eval().to(device, dtype))
            inputs.append(full.narrow(channel_dim(module, full), 0, channels).contiguous())
        if variants is None or not _runs(nets, inputs):
            unmeasured.append(info.name)
            continue
        try:
            forwards = [forward_call(net, x, runtime, device) for net, x in zip(nets, inputs)]
        except ExportError:  # a module ONNX cannot take alone is left untimed, as one that cannot be rebuilt
            unmeasured.append(info.name)
            continue
        timed += len(variants)
        times = timed_rounds(forwards, device, timing.repeats, timing.warmup)
        seconds[i] = statistics.median(times[0])
        for (which, removed, _, _), t in zip(variants, times[1:]):
            per_channel[2 * i + which] = saved_per_channel(times[0], t, removed)
    report(progress, 1.0, "layer latencies measured")
    return LayerLatency(
        str(device),
        batch,
        torch.get_num_threads(),
        [m.name for m in structures.modules],
        seconds,
        per_channel,
        unmeasured,
        timed,
        runtime,
    )
