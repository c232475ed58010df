"""`train`: one training, in this process or across several (DistributedDataParallel); the thin dispatcher above
both, so the training loop and the multi-process controller never import each other."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from ..devices import resolve_device
from ..nets.data import DataBundle
from .distributed import train_distributed
from .ray_training import on_ray, train_on_ray
from .training import SingleProcess, TrainConfig, TrainResult, epoch_loop


def train(
    model: nn.Module,
    data: DataBundle,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `model` in place; with `checkpoint_dir`, save every epoch and resume from the last checkpoint found there.

    With `config.nproc > 1` the training runs across that many processes (see `distributed`; inside a cluster job,
    across that many Ray Train workers, see `ray_training`), with the same result files, progress events and
    cancellation.
    """
    config.validate()
    if config.nproc > 1 and on_ray():  # inside a cluster job: across its nodes
        return train_on_ray(model, data, config, checkpoint_dir, progress, should_stop)
    if config.nproc > 1:
        return train_distributed(model, data, config, checkpoint_dir, progress, should_stop)
    return epoch_loop(
        model,
        data,
        config,
        SingleProcess(resolve_device(config.device)),
        checkpoint_dir,
        progress,
        should_stop,
    )
