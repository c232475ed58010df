"""How much memory an analysis takes per sample, measured on two tiny batches, and the batch a memory budget allows.

The probe runs the method itself on a few samples (2, 4, ... while the peak does not grow yet) and follows every tensor storage it allocates until it is freed
(a dispatch mode, on CPU as on GPU, where no allocator statistics exist on CPU), so the estimate covers the method's
own working set (activations kept for the double backward, captured outputs, SOSP-I's S x S matrix) and nothing is
guessed per architecture. Memory held before the analysis (the model, the samples) is not counted: the budget's
default is a share of what is free with them loaded.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from .devices import available_memory
from .errors import AnalysisError

SMALLEST_PROBE = 2  # the first probe batch
PROBE_LIMIT = 16  # the largest probe batch
GROWTH = 0.25  # the peak grows "with n" when doubling n adds this share
DEFAULT_SHARE = 0.8  # of the free memory, when no budget is given
SMALLEST_PROBED_BATCH = 8  # batches this small are run as asked: probing would cost as much as the analysis


class MemoryBudgetError(AnalysisError):
    """Not even one sample fits the memory budget."""


@dataclass
class MemoryEstimate:
    """Peak tensor bytes of an analysis as fixed + per_sample * batch."""

    fixed: float
    per_sample: float

    def peak(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch

    def batch_within(self, budget: float, largest: int) -> int:
        """The largest batch (at most `largest`) whose estimated peak stays within `budget` bytes."""
        if self.peak(1) > budget:
            raise MemoryBudgetError(f"this analysis needs about {self.peak(1) / 2**20:,.0f} MiB even with one sample "
                                    f"per batch, more than the budget of {budget / 2**20:,.0f} MiB: raise "
                                    "--memory-budget, exclude layers, or use a machine with more memory")
        if self.per_sample <= 0:
            return largest
        return max(1, min(largest, math.floor((budget - self.fixed) / self.per_sample)))

    def describe(self, batch: int, budget: float) -> str:
        return (f"memory: about {self.peak(batch) / 2**20:,.0f} MiB at batch {batch} "
                f"({self.per_sample / 2**20:,.1f} MiB per sample + {self.fixed / 2**20:,.0f} MiB; "
                f"budget {budget / 2**20:,.0f} MiB)")


def default_budget(device: torch.device) -> float:
    """A share of the memory free now on the device (GPU memory, or the machine's available RAM)."""
    return DEFAULT_SHARE * available_memory(device)


class PeakTensorBytes(TorchDispatchMode):
    """The peak, per device type, of the bytes of tensor storages allocated while the mode is on and not yet freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.seen = WeakIdKeyDictionary()

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
        return out


def probe(run: Callable[[int], object], device: torch.device, largest: int) -> MemoryEstimate:
    """Fit fixed + per-sample bytes from the peak tensor memory of `run(n)` (the method on n samples).

    n doubles from 2 until the peak grows with it (a once-only phase, such as SOSP-I's selection on a large S x S
    matrix, can hide the per-sample growth at tiny n), at most to PROBE_LIMIT or `largest`; the last two sizes fit.
    """
    sizes, peaks = [], []
    n = SMALLEST_PROBE
    while True:
        with PeakTensorBytes() as tracker:
            run(n)
        sizes.append(n)
        peaks.append(tracker.peak.get(device.type, 0))
        grew = len(peaks) > 1 and peaks[-1] - peaks[-2] >= GROWTH * peaks[-2]
        if len(peaks) > 1 and (grew or 2 * n > min(PROBE_LIMIT, largest)):
            break
        n *= 2
    per_sample = max(0.0, (peaks[-1] - peaks[-2]) / (sizes[-1] - sizes[-2]))
    return MemoryEstimate(max(0.0, peaks[-1] - per_sample * sizes[-1]), per_sample)
