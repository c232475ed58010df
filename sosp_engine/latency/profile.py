"""Measured inference latency of a model on a device (the median of timed forwards after warm-up), and the latency
profile along a pruning order that a latency target is met with."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import MAX_JSON_FILE_BYTES, read_regular, write_json_atomically
from ..devices import resolve_device
from ..errors import AnalysisError, SospError
from ..progress import ProgressFn, StopFn, check_cancel, report
from .runtimes import EAGER, Forward, check_runtime, forward_call, runtime_label


def _batch_of(example: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    return example[:1].expand(batch, *example.shape[1:]).contiguous().to(device)


def _forward_seconds(forward: Forward, device: torch.device) -> float:
    """Seconds of one inference (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    forward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def timed_rounds(
    forwards: list[Forward], device: torch.device, repeats: int, warmup: int
) -> list[list[float]]:
    """Seconds of each prepared inference, timed one after the other in every round (after `warmup` rounds), so that
    a change of the machine's load hits all alike."""
    times: list[list[float]] = [[] for _ in forwards]
    for i in range(warmup + repeats):
        for forward, record in zip(forwards, times):
            seconds = _forward_seconds(forward, device)
            if i >= warmup:
                record.append(seconds)
    return times


@dataclass(frozen=True)
class LatencyTiming:
    """Where and how latency is timed: device, batch, runtime, rounds (after warm-up ones), and for a profile the
    nets timed along the order."""

    device: str = "cpu"
    batch: int = 1
    runtime: str = EAGER
    points: int = 12  # nets timed along an order, for a profile
    repeats: int = 10
    warmup: int = 3

    @classmethod
    def of(cls, options, device: str | torch.device, points: int = 12) -> "LatencyTiming":
        """The timing an analysis's options ask for (`latency_device`, else `device`; batch; runtime)."""
        where = str(resolve_device(options.latency_device or device))
        return cls(where, options.latency_batch, options.latency_runtime, points)


ONE_NET = LatencyTiming(repeats=20)  # one net or a pair timed once, on the CPU at batch 1


def measure_latency(model: nn.Module, example: torch.Tensor, timing: LatencyTiming = ONE_NET) -> float:
    """Median seconds of one inference of a batch of `example`'s shape, timed as `timing` says."""
    return latency_times(model, None, example, timing)[0].median


@dataclass(frozen=True)
class Timing:
    """Timed inferences of one net: their median and spread (median absolute deviation), in seconds."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        median = self.median
        return statistics.median(abs(t - median) for t in self.seconds)

    @property
    def standard_error(self) -> float:
        """The median's standard error, from the spread (robust to a stray slow round)."""
        return 1.2533 * 1.4826 * self.spread / math.sqrt(len(self.seconds))


def latency_times(
    model: nn.Module, reference: nn.Module | None, example: torch.Tensor, timing: LatencyTiming = ONE_NET
) -> list[Timing]:
    """Inference times of `model` (and `reference`) as `timing` says, timed alternately inference by inference so
    that a change of the machine's load hits both alike. Eager nets keep their train/eval mode and device."""
    device, runtime = torch.device(timing.device), timing.runtime
    x = _batch_of(example, timing.batch, device)
    nets = [model] + ([reference] if reference is not None else [])
    modes = [(net.training, next(net.parameters(), torch.empty(0)).device) for net in nets]
    try:
        forwards = [forward_call(net, x, runtime, device) for net in nets]
        times = timed_rounds(forwards, device, timing.repeats, timing.warmup)
    finally:
        for net, (mode, place) in zip(nets, modes):
            net.train(mode).to(place)
    return [Timing(t) for t in times]


@dataclass(frozen=True)
class LatencyComparison:
    """A net timed alternately with a reference: its median seconds, its latency relative to the reference's, and the
    standard error of that ratio (from both nets' spreads)."""

    seconds: float
    relative: float
    error: float

    @property
    def resolved(self) -> bool:
        """Whether the difference from the reference is more than twice its standard error (not timing noise)."""
        return abs(1 - self.relative) > 2 * self.error

    def change(self) -> str:
        """'12.3% faster (+- 2.0%)', '4.0% slower (+- 1.1%)' or, within the noise, that no difference was resolved."""
        change, margin = 1 - self.relative, 2 * self.error
        if not self.resolved:
            return f"no difference resolved ({-change:+.1%} +- {margin:.1%}, within the timing noise)"
        return f"{abs(change):.1%} {'faster' if change > 0 else 'slower'} (+- {margin:.1%})"


def compare_latency(
    model: nn.Module, reference: nn.Module, example: torch.Tensor, timing: LatencyTiming = ONE_NET
) -> LatencyComparison:
    """`model` timed alternately with `reference` as `timing` says, with the spread of the ratio."""
    own, ref = latency_times(model, reference, example, timing)
    relative = own.median / ref.median
    error = relative * math.hypot(own.standard_error / own.median, ref.standard_error / ref.median)
    return LatencyComparison(own.median, relative, error)


def relative_latency(
    model: nn.Module, reference: nn.Module | None, example: torch.Tensor, timing: LatencyTiming = ONE_NET
) -> tuple[float, float]:
    """Median seconds of `model` and its ratio to `reference`'s, timed alternately (ratio nan without a reference)."""
    if reference is None:
        return measure_latency(model, example, timing), float("nan")
    compared = compare_latency(model, reference, example, timing)
    return compared.seconds, compared.relative


LATENCY_UNIT = "latency"
PROFILE_NAME = "latency.json"
RESOLVE_ADVICE = (
    "Time it at a larger batch (--latency-batch, or 'Timed batch size' on the Ratios page), with more repeats, in ONNX "
    "Runtime (--latency-runtime onnxruntime), or on a quieter machine"
)
REFINE_POINTS = 6  # more nets timed at most, per target, where the profile's line picks an unmeasured prefix


@dataclass
class LatencyProfile:
    """Measured latency of the physically pruned net along one pruning order: prefix length -> latency relative to the
    unpruned net (each point timed alternately with the unpruned net, so the machine's load cancels out).

    A mask of the order is a prefix of it, so this curve is all a latency target needs; it is measured on the user's
    device and batch size, where real kernels make latency far from proportional to MACs (odd widths, small layers).
    """

    device: str
    batch: int
    threads: int
    reference_seconds: float
    prefixes: list[int]
    relative: list[float]
    runtime: str = EAGER  # profiles stored before runtimes were chosen were timed in eager PyTorch
    refined_at: list[float] = field(
        default_factory=list
    )  # targets already refined: a later reader slices, never re-times
    errors: list[float] = field(
        default_factory=list
    )  # each point's standard error ([]: stored before they were kept)

    def timing(self, repeats: int = 10) -> LatencyTiming:
        """How more points of this profile are timed: where and as it was."""
        return LatencyTiming(self.device, self.batch, self.runtime, repeats=repeats)

    def where(self) -> str:
        """Where the profile was timed, in words (runtime, device, batch, threads)."""
        return f"{runtime_label(self.runtime, self.device)} at batch {self.batch} ({self.threads} threads)"

    def matches(self, device: str | torch.device, batch: int, runtime: str) -> bool:
        """Whether this profile was timed on `device` at `batch` in `runtime`."""
        return (self.device, self.batch, self.runtime) == (str(torch.device(device)), batch, runtime)

    def predict(self, prefix: int | np.ndarray) -> np.ndarray:
        """Latency relative to the unpruned net at a prefix length, interpolated between the measured prefixes."""
        return np.interp(prefix, self.prefixes, self.relative)

    def at(self, prefix: int) -> "LatencyComparison":
        """The net pruned at `prefix` against the unpruned one: measured where it is a point of the profile, else
        interpolated between the points around it (spread too; nan where the profile kept none)."""
        relative = float(self.predict(prefix))
        if len(self.errors) == len(self.relative):
            error = float(np.interp(prefix, self.prefixes, self.errors))
        else:
            error = float("nan")
        return LatencyComparison(relative * self.reference_seconds, relative, error)

    def describe_at(self, prefix: int) -> str:
        """One line for a report: the latency at `prefix`, measured or interpolated, with its spread and where."""
        how = "measured" if prefix in self.prefixes else "interpolated from the profile"
        latency = self.at(prefix)
        return (
            f"{1000 * self.reference_seconds:.2f} ms -> {1000 * latency.seconds:.2f} ms, {latency.change()} "
            f"({how}, {self.where()})"
        )

    def prefix_for(self, ratio: float, n_prunable: int, stops: list[int] | None = None) -> int:
        """The shortest prefix (a rounding stop if given) whose predicted latency is at most 1 - ratio of the
        unpruned net's."""
        if not 0 <= ratio < 1:
            raise AnalysisError(f"the latency reduction must be in [0, 1), got {ratio}")
        candidates = np.array(stops if stops is not None else range(n_prunable + 1))
        reached = np.nonzero(self.predict(candidates) <= 1 - ratio + 1e-12)[0]
        if not len(reached):
            raise AnalysisError(
                f"a latency reduction of {ratio:.3f} is not reached in {self.where()}: at most "
                f"{1 - min(self.relative):.3f} was measured along this order (with this cap)"
            )
        prefix = int(candidates[reached[0]])
        why = self.unresolved(prefix, ratio, int(candidates[reached[0] - 1]) if reached[0] > 0 else None)
        if why:
            raise AnalysisError(
                f"a latency reduction of {ratio:.1%} cannot be resolved in {self.where()}: {why}. {RESOLVE_ADVICE}"
            )
        return prefix

    def unresolved(self, prefix: int, ratio: float, previous: int | None = None) -> str | None:
        """Why timing noise, not the nets, would decide the mask at `ratio` (picked at `prefix`), or None: the pick
        measured no reduction beyond its spread, or an earlier point lies within its spread of the target, so which
        prefix reaches the target first is noise (the stop just before the pick, `previous`, is one step away: either
        is the mask at that resolution). Profiles stored without spreads are taken as they are."""
        if len(self.errors) != len(self.relative):
            return None
        line = 1 - ratio
        for point, relative, error in zip(self.prefixes, self.relative, self.errors):
            if point == prefix and not 1 - relative > 2 * error:
                return (
                    f"the net pruned at {point} structures measured {relative:.3f} +- {2 * error:.3f} of the "
                    "unpruned net's latency, no reduction beyond the timing spread"
                )
            if 0 < point < prefix and point != previous and relative - line <= 2 * error:
                return (
                    f"the net pruned at {point} structures measured {relative:.3f} +- {2 * error:.3f}, within the "
                    f"timing spread of the target {line:.3f}: whether it or the net at {prefix} reaches the target "
                    "first is decided by noise"
                )
        rises = [note for note, end in zip(self._rises(), self.prefixes[1:]) if note and end <= prefix]
        return f"{rises[0]}, so the profile follows noise up to the target" if rises else None

    def _rises(self) -> list[str | None]:
        """Per step between neighbouring points: the rise of latency beyond both points' spread, in words, or None."""
        return [
            f"latency rises from {self.relative[i - 1]:.3f} at {self.prefixes[i - 1]} structures to "
            f"{self.relative[i]:.3f} at {self.prefixes[i]}, beyond the timing spread"
            if self.relative[i] - self.relative[i - 1] > 2 * math.hypot(self.errors[i], self.errors[i - 1])
            else None
            for i in range(1, len(self.relative))
        ]

    def reaches(self, ratio: float) -> bool:
        """Whether some measured point is at most 1 - ratio of the unpruned net's latency."""
        return min(self.relative) <= 1 - ratio + 1e-12

    def add_point(self, prefix: int, measured: "LatencyComparison") -> None:
        """Insert one more measured prefix, keeping the prefixes sorted."""
        at = int(np.searchsorted(self.prefixes, prefix))
        self.prefixes.insert(at, int(prefix))
        self.relative.insert(at, float(measured.relative))
        if len(self.errors) == len(self.relative) - 1:
            self.errors.insert(at, float(measured.error))

    def noise(self) -> list[str]:
        """Why the profile cannot be read as a curve, in words ([] where it can or its spread was not kept): latency
        rising along the order by more than the points' spread, or a spread larger than the steps between points."""
        if len(self.errors) != len(self.relative) or len(self.relative) < 3:
            return []
        notes = [note for note in self._rises() if note]
        steps = np.abs(np.diff(self.relative))
        margin = 2 * statistics.median(self.errors[1:])
        if margin > statistics.median(steps):
            notes.append(
                f"the timing spread (+- {margin:.3f}) is larger than the typical step between measured points "
                f"({statistics.median(steps):.3f})"
            )
        return notes

    def noise_warning(self) -> str | None:
        """One line that says the profile follows timing noise and what to change, or None."""
        notes = self.noise()
        if not notes:
            return None
        return (
            f"the latency profile in {self.where()} follows timing noise: {'; '.join(notes[:3])}. "
            f"{RESOLVE_ADVICE} before trusting a latency target"
        )

    def save(self, path: str | Path) -> Path:
        """Written whole or not at all (a study's cells may save the same profile at once)."""
        path = Path(path)
        write_json_atomically(path, asdict(self))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        try:
            return cls(**json.loads(read_regular(path, MAX_JSON_FILE_BYTES)))
        except FileNotFoundError:
            raise AnalysisError(
                f"no latency profile at '{path}': run analyze with --unit latency first"
            ) from None
        except (ValueError, TypeError, OSError, RecursionError, SospError) as exc:
            raise AnalysisError(f"the latency profile '{path}' is unreadable ({exc})") from None


def prefix_grid(n_prunable: int, points: int, stops: list[int] | None = None) -> list[int]:
    """`points` prefix lengths from 0 to `n_prunable`, evenly spaced (each moved up to the next rounding stop)."""
    if points < 2:
        raise AnalysisError(f"a latency profile needs at least 2 points, got {points}")
    grid = {round(i * n_prunable / (points - 1)) for i in range(points)}
    if stops is not None:
        grid = {next_stop(k, stops) for k in grid}
    return sorted(grid)


def next_stop(prefix: int, stops: list[int]) -> int:
    """The first stop at or after `prefix` (the last stop beyond them all)."""
    return next((s for s in stops if s >= prefix), stops[-1])


@dataclass(frozen=True)
class Order:
    """An analysis's pruning order as latency timing reads it: structure keys (first pruned first), how many of them
    may be pruned, and the prefix lengths a rounded order may stop at (None: any)."""

    keys: list[str]
    n_prunable: int
    stops: list[int] | None = None

    def prefix_keys(self, k: int) -> set[str]:
        return set(self.keys[:k])


def measure_profile(
    workbench, order: Order, timing: LatencyTiming, progress: ProgressFn = None, should_stop: StopFn = None
) -> LatencyProfile:
    """Prune the workbench's model physically at `timing.points` prefixes of `order` and time each against the
    unpruned net in the timing's runtime on its device."""
    check_runtime(timing.runtime)
    from ..pruning.masks import pruned_copy

    model, example = workbench.model, workbench.example
    grid = prefix_grid(order.n_prunable, timing.points, order.stops)[1:]
    reference = measure_latency(model, example, timing)
    relative, errors = [1.0], [0.0]
    for i, k in enumerate(grid):
        check_cancel(should_stop)
        report(progress, i / len(grid), f"latency of the net pruned at {k}/{order.n_prunable} structures")
        smaller = pruned_copy(model, workbench.structures, order.prefix_keys(k), example)
        measured = compare_latency(smaller, model, example, timing)
        relative.append(measured.relative)
        errors.append(measured.error)
    report(progress, 1.0, "latency profile measured")
    return LatencyProfile(
        str(torch.device(timing.device)),
        timing.batch,
        torch.get_num_threads(),
        reference,
        [0] + grid,
        relative,
        timing.runtime,
        errors=errors,
    )


def refine_profile(
    profile: LatencyProfile,
    workbench,
    order: Order,
    ratio: float,
    should_stop: StopFn = None,
    repeats: int = 10,
) -> bool:
    """Time the net at the prefix a latency target picks until the pick is a measured point (at most REFINE_POINTS
    more): between two measured points latency need not follow the line (a narrower kernel can be slower), so the
    mask's own latency is measured, not interpolated. Returns whether points were added."""
    from ..pruning.masks import pruned_copy

    added = False
    for _ in range(REFINE_POINTS):
        k = profile.prefix_for(ratio, order.n_prunable, order.stops)
        if k in profile.prefixes:
            break
        check_cancel(should_stop)
        smaller = pruned_copy(workbench.model, workbench.structures, order.prefix_keys(k), workbench.example)
        profile.add_point(
            k,
            compare_latency(smaller, workbench.model, workbench.example, profile.timing(repeats)),
        )
        added = True
    return added


def refine_at_targets(
    profile: LatencyProfile, workbench, order: Order, targets: list[float], should_stop: StopFn = None
) -> bool:
    """Refine the profile at the targets it was not refined at yet, all its targets in ascending order: a larger
    target's pick lies at or beyond a smaller one's measured pick, so the points timed for it cannot move that pick.
    Once refined at a target, a profile is only sliced there, so every reader of a stored profile gets the same mask.
    Targets out of reach are left to raise where their mask is asked for. Returns whether the profile changed."""
    new = [t for t in targets if t not in profile.refined_at and profile.reaches(t)]
    if not new:
        return False
    profile.refined_at = sorted(set(profile.refined_at) | set(new))
    for target in profile.refined_at:
        refine_profile(profile, workbench, order, target, should_stop)
    return True


def matching_profile(
    folder: str | Path, device: str | torch.device, batch: int, runtime: str
) -> LatencyProfile | None:
    """The latency profile stored in an analysis's folder when it was timed on `device` at `batch` in `runtime`."""
    path = Path(folder) / PROFILE_NAME
    stored = LatencyProfile.load(path) if path.exists() else None
    return stored if stored is not None and stored.matches(device, batch, runtime) else None


def stored_profile(
    result,
    workbench,
    folder: str | Path,
    timing: LatencyTiming,
    targets: list[float] = (),
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> LatencyProfile:
    """The latency profile of an analysis (`result`) stored in `folder`: read if it was timed as `timing` says, else
    measured along its order there and saved; then refined at `targets` (saved again), so the CLI, the dashboard,
    jobs and studies measure it once, resume without re-timing, and slice the same mask at a target."""
    path = Path(folder) / PROFILE_NAME
    order = result.order(workbench.structures)
    profile = matching_profile(folder, timing.device, timing.batch, timing.runtime)
    if profile is None:
        profile = measure_profile(workbench, order, timing, progress, should_stop)
        profile.save(
            path
        )  # before refining: a target out of reach raises there, and a resume must not re-time
    if refine_at_targets(profile, workbench, order, list(targets), should_stop):
        profile.save(path)
    return profile


def latency_mask(
    result,
    workbench,
    folder: str | Path,
    target: float,
    timing: LatencyTiming,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> tuple[set[str], LatencyProfile]:
    """The mask of an analysis at a latency target, from its stored profile (measured and refined there first where
    needed): the one way every front end gets it, so one target gives one mask."""
    profile = stored_profile(result, workbench, folder, timing, [target], progress, should_stop)
    return result.mask(workbench.structures, target, LATENCY_UNIT, profile), profile


def mask_at_target(
    result,
    workbench,
    folder: str | Path,
    ratio: float,
    unit: str,
    timing: LatencyTiming,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> tuple[set[str], LatencyProfile | None]:
    """The mask of an analysis stored in `folder` at `ratio` of `unit`, with the latency profile a latency target
    was met on (None for the other units): the one way the CLI and jobs cut an analysis's mask."""
    if unit != LATENCY_UNIT:
        return result.mask(workbench.structures, ratio, unit), None
    return latency_mask(result, workbench, folder, ratio, timing, progress, should_stop)
