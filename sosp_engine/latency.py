"""Measured inference latency of a model on a device: the median of timed forwards after warm-up."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def measure_latency(model: nn.Module, example: torch.Tensor, device: str | torch.device = "cpu", batch: int = 1,
                    repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one eval-mode forward of a `batch` of `example`'s shape on `device` (synchronised on CUDA)."""
    device = torch.device(device)
    x = example[:1].expand(batch, *example.shape[1:]).contiguous().to(device)
    was_training = model.training
    model.eval().to(device)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times)
