"""SGD training and fine-tuning with the paper's defaults, per-epoch checkpoints, exact resume and cancellation."""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..nets.data import DataBundle
from ..atomic import finish_interrupted_save, load_with_fallback, previous_path, save_atomically
from ..devices import deterministic_kernels
from ..nets.setup import stored_config
from ..errors import SospError
from ..options import check_config

CHECKPOINT_NAME = "last.pt"


class TrainingError(SospError):
    """Training cannot start or cannot go on (bad settings, a loss that is not finite)."""


@stored_config
@dataclass
class TrainConfig:
    """Paper defaults: lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, step decay x0.1 at 60 % and 80 %."""

    epochs: Annotated[int, Field(ge=0, title="Epochs", description="training epochs")] = 200
    lr: Annotated[float, Field(gt=0, title="Learning rate", description="SGD's initial learning rate")] = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1, title="Momentum", description="SGD's momentum")] = 0.9
    weight_decay: Annotated[float, Field(ge=0, title="Weight decay", description="SGD's L2 weight decay")] = (
        1e-4
    )
    batch_size: Annotated[int, Field(ge=1, title="Batch size", description="the training batch (global)")] = (
        128
    )
    schedule: Annotated[
        Literal["step", "cosine"],
        Field(title="Schedule", description="step: x0.1 at each milestone; cosine: annealed to zero"),
    ] = "step"
    milestones: Annotated[
        tuple[Annotated[float, Field(gt=0, lt=1)], ...],
        Field(
            title="Milestones",
            description="step schedule: the shares of the epochs where the rate drops x0.1",
        ),
    ] = (0.6, 0.8)
    seed: Annotated[
        int,
        Field(ge=0, lt=2**63, title="Seed", description="the initialisation and the order of the batches"),
    ] = 0
    device: Annotated[str, Field(title="Device", description="where the training runs")] = "auto"
    amp: Annotated[
        bool, Field(title="Mixed precision", description="on CUDA: bfloat16 autocast (ignored on the CPU)")
    ] = True
    nproc: Annotated[
        int,
        Field(
            ge=1,
            le=64,
            title="Processes",
            description="train across this many processes with DistributedDataParallel (one per GPU; gloo on "
            "CPU), same global batch",
        ),
    ] = 1
    sync_bn: Annotated[
        bool,
        Field(
            title="Synchronised BatchNorm",
            description="with more than one process: BatchNorm statistics over the global batch (CUDA only)",
        ),
    ] = False

    def validate(self) -> None:
        """Every value as declared, before any work starts."""
        check_config(self, TrainingError)
        if self.sync_bn and self.nproc == 1:
            raise TrainingError(
                "--sync-bn only applies to a training across processes: give --nproc 2 or more"
            )


@dataclass
class EpochRecord:
    """Metrics after one epoch."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float


@dataclass
class TrainResult:
    """History of a finished (or cancelled) run and its final test metrics."""

    history: list[EpochRecord] = field(default_factory=list)
    test_loss: float = float("nan")
    test_acc: float = float("nan")
    cancelled: bool = False

    def to_dict(self) -> dict:
        return {
            "history": [asdict(h) for h in self.history],
            "test_loss": self.test_loss,
            "test_acc": self.test_acc,
            "cancelled": self.cancelled,
        }

    @classmethod
    def from_dict(cls, value: dict) -> "TrainResult":
        """The result `to_dict` wrote."""
        return cls(
            [EpochRecord(**h) for h in value["history"]],
            value["test_loss"],
            value["test_acc"],
            value["cancelled"],
        )


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the model's current parameters; rebuild it after physical pruning (old parameters are gone)."""
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=False,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Step decay by 10x at the milestone fractions of the epochs, or cosine decay, stepped once per epoch."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    if config.schedule != "step":
        raise ValueError(f"unknown schedule '{config.schedule}'; use step or cosine")
    milestones = sorted({max(1, int(math.floor(f * config.epochs))) for f in config.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def evaluate(
    model: nn.Module, loader, device: torch.device | str = "cpu", amp: bool = True
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of `model` over a loader, in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.no_grad(), _autocast(device, amp):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            total += len(y)
    model.train(was_training)
    return loss_sum / max(total, 1), correct / max(total, 1)


def _seed_epoch(seed: int, epoch: int) -> None:
    """Each epoch's randomness (shuffle, augmentation, dropout) depends only on (seed, epoch), so a resumed
    run repeats it."""
    value = seed * 100003 + epoch
    torch.manual_seed(value)
    np.random.seed(value % (2**32))
    random.seed(value)


class SingleProcess:
    """The training loop's view of its peers when it runs alone: the whole batch here, nothing to agree on."""

    rank, world = 0, 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def batches(
        self, data: DataBundle, config: TrainConfig, epoch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(inputs, labels, size of the global batch) of one epoch, in the order fixed by (seed, epoch)."""
        for x, y in data.loader("train", config.batch_size, shuffle=True, seed=config.seed * 100003 + epoch):
            yield x, y, len(y)

    def any(self, flag: bool) -> bool:
        return flag

    def sum(self, values: list[float]) -> list[float]:
        return values

    def epoch_ended(self, epoch: int, checkpoint: Path | None) -> None:
        """Every process, after each epoch (rank 0 with the checkpoint it wrote): nothing to tell anyone here."""


@deterministic_kernels()
def epoch_loop(
    model: nn.Module,
    data: DataBundle,
    config: TrainConfig,
    team,
    checkpoint_dir: str | Path | None,
    progress: Callable[[dict], None] | None,
    should_stop: Callable[[], bool] | None,
) -> TrainResult:
    """The epoch loop of one training process; `team` (SingleProcess or a distributed rank) says how it shares work.

    The loss of a process's share is scaled so that the gradients averaged over processes equal the gradient of the
    global batch's mean loss, also for an uneven last batch. Only rank 0 reports and writes the checkpoint.
    """
    device = team.device
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = team.wrap(model)
    model = getattr(net, "module", net)
    writer = team.rank == 0
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    result = TrainResult()
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    start_epoch = _resume(ckpt_path, device, model, optimizer, scheduler, result)
    torch.manual_seed(config.seed)
    for epoch in range(start_epoch, config.epochs):
        _seed_epoch(config.seed, epoch)
        net.train()
        sums = _train_epoch(
            net, data, config, team, optimizer, epoch, progress if writer else None, should_stop
        )
        if sums is None:
            result.cancelled = True
            return result
        seen, loss_sum, correct = team.sum(sums)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if writer:
            val_loss, val_acc = evaluate(model, data.loader("val", 512), device, config.amp)
            record = EpochRecord(
                epoch + 1, loss_sum / max(seen, 1), correct / max(seen, 1), val_loss, val_acc, lr
            )
            result.history.append(record)
            if (
                progress is not None
            ):  # metrics first: a kill before the checkpoint lands redoes (and re-records) it
                progress({"phase": "epoch", **asdict(record), "epochs": config.epochs})
            if ckpt_path is not None:
                _save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch + 1, result, config)
        team.epoch_ended(epoch + 1, ckpt_path if writer else None)
    if writer:
        result.test_loss, result.test_acc = evaluate(model, data.loader("test", 512), device, config.amp)
    return result


def _resume(
    ckpt_path: Path | None, device, model: nn.Module, optimizer, scheduler, result: TrainResult
) -> int:
    """Load the epoch checkpoint where there is one (weights, optimizer, schedule, history); the epoch to go on at."""
    if ckpt_path is None:
        return 0
    finish_interrupted_save(ckpt_path)
    if not ckpt_path.is_file() and not previous_path(ckpt_path).is_file():
        return 0
    state = load_with_fallback(ckpt_path, device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    result.history = [EpochRecord(**h) for h in state["history"]]
    return state["epoch"]


def _train_epoch(
    net: nn.Module,
    data: DataBundle,
    config: TrainConfig,
    team,
    optimizer,
    epoch: int,
    progress: Callable[[dict], None] | None,
    should_stop: Callable[[], bool] | None,
) -> list | None:
    """One epoch of this process's share: [samples seen, loss sum, correct], or None when cancelled."""
    device = team.device
    n_batches = math.ceil(len(data.train) / config.batch_size)
    seen, loss_sum, correct = 0, 0.0, 0
    for b, (x, y, global_size) in enumerate(team.batches(data, config, epoch)):
        if team.any(should_stop is not None and should_stop()):
            return None
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, config.amp):
            out = net(x)
            share_sum = F.cross_entropy(out.float(), y, reduction="sum")
            loss = share_sum * (team.world / global_size)
        batch_loss = share_sum.item() / max(len(y), 1)
        if not math.isfinite(batch_loss):
            raise TrainingError(
                f"the training loss became {batch_loss} in epoch {epoch + 1}, batch {b + 1}: "
                "lower the learning rate or check the weights and data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        loss_sum += share_sum.item()
        correct += (out.argmax(1) == y).sum().item()
        if progress is not None:
            fraction = (b + 1) / n_batches
            progress(
                {"phase": "train", "epoch": epoch + 1, "epochs": config.epochs, "fraction": fraction}
                | {"loss": loss_sum / max(seen, 1)}
            )
    return [seen, loss_sum, correct]


def _save_checkpoint(
    path: Path, model: nn.Module, optimizer, scheduler, epoch: int, result: TrainResult, config: TrainConfig
) -> None:
    """The epoch checkpoint a resume goes on from (the previous one kept until this one is whole)."""
    save_atomically(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "history": [asdict(h) for h in result.history],
            "config": asdict(config),
        },
        path,
        keep_previous=True,
    )
