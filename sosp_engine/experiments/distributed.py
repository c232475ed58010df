"""One training across several processes with PyTorch DistributedDataParallel: the same global batches, rank 0 writes.

The caller's process stays the controller: it spawns `nproc` training processes, relays rank 0's progress events,
passes a cancel on, and loads the trained weights back into the caller's model. Each global batch of the
single-process run is split across the processes, so a run with `--sync-bn` (or without BatchNorm) follows the
single-process run up to float rounding; checkpoints are the single-process format and resume with any `nproc`.
"""

from __future__ import annotations

import ctypes
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, default_collate

from ..atomic import load_verified, save_atomically
from ..nets.data import DataBundle
from ..devices import DeviceError, resolve_device
from ..nets.registry import USER_MODULE_PREFIX, load_user_module
from .training import TrainConfig, TrainingError, TrainResult, epoch_loop

POLL_SECONDS = 0.2
FINAL_NAME = "final.pt"  # rank 0's trained weights and result
FAILURE_GRACE_SECONDS = 5.0  # after a failure, how long the other ranks get to end and say why


class IndexDataset(torch.utils.data.Dataset):
    """0 .. n-1: a loader over it yields the sample order of the single-process loader with the same seed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class DistributedRank:
    """The training loop's view of its peers in a process group: its share of each global batch, collective votes."""

    def __init__(self, rank: int, world: int, device: torch.device, sync_bn: bool) -> None:
        self.rank, self.world, self.device, self.sync_bn = rank, world, device, sync_bn

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def batches(
        self, data: DataBundle, config: TrainConfig, epoch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """This rank's contiguous share of every global batch; a last batch smaller than the process count is
        skipped."""
        order = DataLoader(
            IndexDataset(len(data.train)),
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed * 100003 + epoch),
        )
        for indices in order:
            if len(indices) < self.world:
                continue
            share = indices.tensor_split(self.world)[self.rank].tolist()
            x, y = default_collate([data.train[i] for i in share])
            yield x, torch.as_tensor(y), len(indices)

    def any(self, flag: bool) -> bool:
        vote = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item())

    def sum(self, values: list[float]) -> list[float]:
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(total)
        return total.tolist()

    def epoch_ended(self, epoch: int, checkpoint: Path | None) -> None:
        """Every rank, after each epoch: rank 0 has written the checkpoint; nothing else to do here."""

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def training_devices(config: TrainConfig) -> list[torch.device]:
    """The device of each rank: GPU r for rank r on a CUDA machine, else the CPU for all (gloo)."""
    device = resolve_device(config.device)
    if device.type == "cpu":
        if config.sync_bn:
            raise TrainingError(
                "--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); on CPU leave "
                "it out: each process then keeps its own BatchNorm statistics"
            )
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if config.nproc > cores:
            raise TrainingError(
                f"--nproc {config.nproc} training processes on a CPU with {cores} cores would only "
                f"wait on each other: use --nproc {cores} or fewer"
            )
        return [device] * config.nproc
    available = torch.cuda.device_count()
    if config.nproc > available:
        raise DeviceError(
            f"--nproc {config.nproc} needs {config.nproc} GPUs, {available} visible; lower --nproc "
            "or train on CPU with --device cpu"
        )
    return [torch.device("cuda", r) for r in range(config.nproc)]


def _user_modules(model: nn.Module) -> dict[str, str]:
    """The user model files the model's classes come from (the workers load them before they unpickle the model)."""
    names = {type(m).__module__ for m in model.modules() if type(m).__module__.startswith(USER_MODULE_PREFIX)}
    return {name: sys.modules[name].__file__ for name in names}


def _die_with_parent() -> None:
    """Linux: end this worker when its controller dies (a killed job leaves no orphan holding the GPU)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class _WorkerTask:
    """What every training process is handed: the controller's folder (model, rendezvous, result), the data, the
    schedule, a device per rank, the user modules to import, where epoch checkpoints go, its CPU threads."""

    folder: str
    data: DataBundle
    config: TrainConfig
    devices: list[torch.device]
    user_modules: dict[str, str]
    checkpoint_dir: str | None
    threads: int


def _worker(rank: int, world: int, task: _WorkerTask, events, stop) -> None:
    folder, data, config, checkpoint_dir = task.folder, task.data, task.config, task.checkpoint_dir
    devices, user_modules = task.devices, task.user_modules
    _die_with_parent()
    torch.set_num_threads(task.threads)
    try:
        for name, path in user_modules.items():  # code the user already chose to run in the controller
            load_user_module(name, path)
        # our own pickle, written by the controller moments ago into its private temporary folder
        model = torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=False)
        device = devices[rank]
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"file://{folder}/rendezvous",
            rank=rank,
            world_size=world,
        )
        try:
            team = DistributedRank(rank, world, device, config.sync_bn)
            progress = (lambda event: events.put(("progress", event))) if rank == 0 else None
            result = epoch_loop(
                model, data, config, team, checkpoint_dir, progress, stop.is_set if rank == 0 else None
            )
            if rank == 0:
                save_final(model, result, folder)
        finally:
            dist.destroy_process_group()
    except BaseException as exc:
        events.put(("error", rank, type(exc).__name__, str(exc)))
        raise


def save_final(model: nn.Module, result: TrainResult, folder: str | Path) -> None:
    """Rank 0's trained weights and result, for the controller that started the ranks."""
    save_atomically(
        {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "result": result.to_dict()},
        Path(folder) / FINAL_NAME,
    )


def load_final(model: nn.Module, folder: str | Path) -> TrainResult:
    """Load what `save_final` wrote: the weights into `model`; returns the result."""
    final = load_verified(Path(folder) / FINAL_NAME)
    model.load_state_dict(final["model"])
    return TrainResult.from_dict(final["result"])


def _relay(events, progress: Callable[[dict], None] | None, timeout: float) -> tuple | None:
    """Pass the workers' progress events on to the caller; returns a worker's error event (rank, kind, message)."""
    try:
        event = events.get(timeout=timeout)
    except queue.Empty:
        return None
    if event[0] == "progress":
        if progress is not None:
            progress(event[1])
        return None
    return event[1:]


def failure_message(errors: list[tuple], exit_codes: list[int | None]) -> str:
    """What ended a distributed run, naming the rank that failed first: a rank killed by a signal sends no error of
    its own, and the ranks waiting on it then fail with a lost connection, so a killed rank is named before them."""
    reported = {rank for rank, _, _ in errors}
    killed = [(r, -c) for r, c in enumerate(exit_codes) if c is not None and c < 0 and r not in reported]
    resume = "; resume to continue from the last epoch checkpoint"
    if killed:
        rank, signal_number = killed[0]
        then = f" (then {', '.join(f'process {r}: {k}' for r, k, _ in errors)})" if errors else ""
        return f"training process {rank} of the distributed run was killed (signal {signal_number}){then}{resume}"
    if errors:
        rank, kind, message = errors[0]
        if kind == "TrainingError":  # the training's own words (e.g. a nan loss), the same on every rank
            return message
        return f"training process {rank} of the distributed run failed: {kind}: {message}"
    return f"a training process of the distributed run ended (exit codes {exit_codes}){resume}"


def _ended(processes, events, progress, grace: float) -> list[tuple]:
    """Wait up to `grace` seconds for every worker to end; the error events they sent meanwhile."""
    errors, deadline = [], time.monotonic() + grace
    while time.monotonic() < deadline and any(p.is_alive() for p in processes.processes):
        error = _relay(events, progress, POLL_SECONDS)
        if error is not None:
            errors.append(error)
    while not events.empty():
        error = _relay(events, progress, POLL_SECONDS)
        if error is not None:
            errors.append(error)
    return errors


def train_distributed(
    model: nn.Module,
    data: DataBundle,
    config: TrainConfig,
    checkpoint_dir: str | Path | None,
    progress: Callable[[dict], None] | None,
    should_stop: Callable[[], bool] | None,
) -> TrainResult:
    """Train `model` in place across `config.nproc` processes (gloo on CPU, NCCL on GPUs); see the module docstring."""
    devices = training_devices(config)
    folder = Path(tempfile.mkdtemp(prefix="sosp-ddp-"))
    context = mp.get_context("spawn")
    events, stop = context.Queue(), context.Event()
    threads = max(1, torch.get_num_threads() // config.nproc) if devices[0].type == "cpu" else 1
    processes = None
    try:
        try:
            torch.save(model.cpu(), folder / "model.pt")
        except Exception as exc:  # a lambda or a hook of the model's own that pickle cannot send
            raise TrainingError(
                f"this model cannot be sent to training processes ({type(exc).__name__}: {exc}); "
                "train it with --nproc 1"
            ) from None
        if checkpoint_dir is not None:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        task = _WorkerTask(
            str(folder),
            data,
            config,
            devices,
            _user_modules(model),
            str(checkpoint_dir) if checkpoint_dir is not None else None,
            threads,
        )
        args = (config.nproc, task, events, stop)
        processes = mp.start_processes(
            _worker, args=args, nprocs=config.nproc, join=False, start_method="spawn"
        )
        while True:
            if should_stop is not None and should_stop():
                stop.set()
            error = _relay(events, progress, POLL_SECONDS)
            if error is not None or any(p.exitcode not in (None, 0) for p in processes.processes):
                errors = ([error] if error else []) + _ended(
                    processes, events, progress, FAILURE_GRACE_SECONDS
                )
                raise TrainingError(failure_message(errors, [p.exitcode for p in processes.processes]))
            if all(not p.is_alive() for p in processes.processes):
                break
        errors = _ended(processes, events, progress, 0.0)
        if errors:
            raise TrainingError(failure_message(errors, [p.exitcode for p in processes.processes]))
        if not (folder / FINAL_NAME).exists():
            raise TrainingError(
                "the distributed training ended without its result; resume to continue from the last "
                "epoch checkpoint"
            )
        return load_final(model, folder)
    finally:
        if processes is not None:
            for p in processes.processes:
                if p.is_alive():
                    p.terminate()
            for p in processes.processes:
                p.join(5)
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
