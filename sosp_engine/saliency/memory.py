"""How much memory an analysis takes per sample, measured on a few tiny batches, and the batch a memory budget allows.

The probe runs the method itself on a few samples (1, 2, 4, ... while the peak does not grow yet) and follows every
tensor storage it allocates until it is freed (a dispatch mode, on CPU as on GPU, where no allocator statistics exist
on CPU), so the estimate covers the method's own working set (activations kept for the double backward, captured
outputs, SOSP-I's S x S matrix) and nothing is guessed per architecture. Memory held before the analysis (the model,
the samples) is not counted: the budget's default is a share of what is free with them loaded.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from ..devices import available_memory
from ..errors import AnalysisError

SMALLEST_PROBE = 1  # the first probe batch
PROBE_LIMIT = 16  # the largest probe batch
GROWTH = 0.25  # the peak grows "with n" when doubling n adds this share
# Of the free memory, when no budget is given. The budget counts live tensors; on CPU glibc's heap held up to 1.9x
# those under SOSP-H's double backward (docs/benchmarks.md), and the kernel kills a process that outgrows the RAM.
DEFAULT_SHARE = {"cuda": 0.8, "cpu": 0.5}


class MemoryBudgetError(AnalysisError):
    """Not even one sample fits the memory budget."""


@dataclass
class MemoryEstimate:
    """Peak tensor bytes of an analysis: fixed + per_sample * batch over the batched work, or the peak of its work on
    S x S matrices (`floor`: SOSP-I's Gram accumulation and selection, the same size at any batch) where higher."""

    fixed: float
    per_sample: float
    floor: float = 0.0

    def peak(self, batch: int) -> float:
        return max(self.floor, self.fixed + self.per_sample * batch)

    def batch_within(self, budget: float, largest: int) -> int:
        """The largest batch (at most `largest`) whose estimated peak stays within `budget` bytes."""
        if self.peak(1) > budget:
            raise MemoryBudgetError(
                f"this analysis needs about {self.peak(1) / 2**20:,.0f} MiB even with one sample "
                f"per batch, more than the budget of {budget / 2**20:,.0f} MiB: raise "
                "--memory-budget, exclude layers, or use a machine with more memory"
            )
        if self.per_sample <= 0:
            return largest
        return max(1, min(largest, math.floor((budget - self.fixed) / self.per_sample)))

    def describe(self, batch: int, budget: float) -> str:
        matrix = (
            f"; its Gauss-Newton matrix work {self.floor / 2**20:,.0f} MiB"
            if self.floor > self.fixed + self.per_sample * batch
            else ""
        )
        return (
            f"memory: about {self.peak(batch) / 2**20:,.0f} MiB at batch {batch} "
            f"({self.per_sample / 2**20:,.1f} MiB per sample + {self.fixed / 2**20:,.0f} MiB{matrix}; "
            f"budget {budget / 2**20:,.0f} MiB)"
        )


def default_budget(device: torch.device) -> float:
    """A share of the memory free now on the device (GPU memory, or the machine's available RAM)."""
    return DEFAULT_SHARE.get(device.type, DEFAULT_SHARE["cpu"]) * available_memory(device)


def budget_bytes(budget_gb: float | str, device: torch.device) -> float:
    """An analysis's memory budget in bytes: GB as given, or 'auto': the default share of what is free where it runs."""
    return default_budget(device) if budget_gb == "auto" else budget_gb * 2**30


_TRACKERS: list["PeakTensorBytes"] = []  # the modes on now, innermost last
BATCHED, MATRIX = "batched", "matrix"  # the batched work; the once-sized S x S work (Gram, selection)


class PeakTensorBytes(TorchDispatchMode):
    """The peak, per device type, of the bytes of tensor storages allocated while the mode is on and not yet freed;
    also per phase (`memory_phase`), so a once-only phase does not hide how the batched work grows."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.phase = BATCHED
        self.phase_peak: dict[tuple[str, str], int] = {}
        self.seen = WeakIdKeyDictionary()

    def __enter__(self):
        _TRACKERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _TRACKERS.remove(self)
        return super().__exit__(*exc)

    def _release(self, kind: str, size: int) -> None:
        self.live[kind] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage in self.seen:
                continue
            kind, size = t.device.type, storage.nbytes()
            self.seen[storage] = size
            weakref.finalize(storage, self._release, kind, size)
            self.live[kind] = self.live.get(kind, 0) + size
            self.peak[kind] = max(self.peak.get(kind, 0), self.live[kind])
            key = (self.phase, kind)
            self.phase_peak[key] = max(self.phase_peak.get(key, 0), self.live[kind])
        return out


@contextmanager
def memory_phase(name: str) -> Iterator[None]:
    """Count the tensors allocated in this block towards phase `name` of the tracker that is on (if any)."""
    tracker = _TRACKERS[-1] if _TRACKERS else None
    if tracker is None:
        yield
        return
    previous, tracker.phase = tracker.phase, name
    try:
        yield
    finally:
        tracker.phase = previous


def probe(
    run: Callable[[int], object], device: torch.device, largest: int, budget: float | None = None
) -> MemoryEstimate:
    """Fit fixed + per-sample bytes from the peak tensor memory of `run(n)` (the method on n samples).

    The batched work's peak and the peak of the work on S x S matrices (`memory_phase(MATRIX)`: SOSP-I's Gram
    accumulation and greedy order) are followed apart, so the large once-sized matrices cannot hide how the batched
    work grows. n doubles from 1 until the batched peak grows with it, at most to PROBE_LIMIT and below `largest`
    (that batch is the analysis itself); the last two sizes fit the line, and the S x S work's peak is the floor.
    A size whose estimate from the sizes before it exceeds `budget` is not run: a probe must not be what runs out of
    memory.
    """
    sizes, peaks, floor = [], [], 0
    n = SMALLEST_PROBE
    while True:
        with PeakTensorBytes() as tracker:
            run(n)
        sizes.append(n)
        peaks.append(tracker.phase_peak.get((BATCHED, device.type), 0))
        floor = tracker.phase_peak.get((MATRIX, device.type), 0)
        estimate = _fitted(sizes, peaks, floor)
        grew = len(peaks) > 1 and peaks[-1] - peaks[-2] >= GROWTH * peaks[-2]
        if (
            grew
            or 2 * n > PROBE_LIMIT
            or 2 * n >= largest
            or (budget is not None and estimate.peak(2 * n) > budget)
        ):
            return estimate
        n *= 2


def _fitted(sizes: list[int], peaks: list[int], floor: int) -> MemoryEstimate:
    """The line through the last two probes; from one probe, all of its peak counts as per-sample (an upper bound)."""
    if len(sizes) == 1:
        return MemoryEstimate(0.0, peaks[0] / sizes[0], float(floor))
    per_sample = max(0.0, (peaks[-1] - peaks[-2]) / (sizes[-1] - sizes[-2]))
    return MemoryEstimate(max(0.0, peaks[-1] - per_sample * sizes[-1]), per_sample, float(floor))
