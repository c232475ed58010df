"""One training across the nodes of a Ray cluster with Ray Train (`TorchTrainer`): each worker runs the training loop
of a DistributedDataParallel process (`DistributedRank`, `epoch_loop`) in the process group Ray Train sets up
(gloo on CPUs, NCCL on GPUs). Rank 0 writes the epoch checkpoints into the job's run folder on the shared storage,
in the single-process format, so a resume continues from them with any number of workers; every rank reports each
epoch to Ray Train, rank 0 with a copy of that checkpoint, which Ray Train keeps (the latest) in `ray-train/` beside
them. A cluster job's task turns this on (`workers_of_this_job`) for its trainings.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..nets.data import DataBundle
from ..nets.registry import load_user_module
from .distributed import FINAL_NAME, DistributedRank, _user_modules, load_final, save_final
from .training import TrainConfig, TrainingError, TrainResult, epoch_loop

FOLDER, STOP_FILE = "ray-train", "stop"
_workers: ContextVar[dict | None] = ContextVar("ray_train_workers", default=None)


@contextmanager
def workers_of_this_job(workers: dict) -> Iterator[None]:
    """While a cluster job's task runs: its trainings with nproc > 1 use Ray Train with these worker resources
    (`use_gpu`, `resources_per_worker`, `accelerator_type`)."""
    token = _workers.set(workers)
    try:
        yield
    finally:
        _workers.reset(token)


def on_ray() -> bool:
    """Whether trainings across processes go to Ray Train here (inside a cluster job's task)."""
    return _workers.get() is not None


class RayTrainRank(DistributedRank):
    """A rank under Ray Train: after each epoch every rank reports to Ray Train, rank 0 with its checkpoint, which Ray
    Train keeps (the latest) under the run folder's ray-train/ on the shared storage."""

    def epoch_ended(self, epoch: int, checkpoint: Path | None) -> None:
        import ray.train

        if checkpoint is None or not checkpoint.exists():
            ray.train.report({"epoch": epoch})
            return
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy2(checkpoint, Path(folder) / checkpoint.name)
            ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _worker_loop(setup: dict) -> None:
    """One Ray Train worker: the job's training loop as rank `world_rank` of the group Ray Train initialised."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    for name, path in setup["user_modules"].items():  # code the user already chose to run in the job
        load_user_module(name, path)
    # our own pickle of the job's model, made moments ago by the job's task
    model = torch.load(io.BytesIO(setup["model"]), map_location="cpu", weights_only=False)
    torch.set_num_threads(setup["threads"])
    device = ray.train.torch.get_device()
    config: TrainConfig = setup["config"]
    folder = Path(setup["folder"])
    team = RayTrainRank(rank, world, device, config.sync_bn)
    progress = setup["events"].put if rank == 0 else None
    stop = (folder / STOP_FILE).exists if rank == 0 else None
    result = epoch_loop(model, setup["data"], config, team, setup["checkpoint_dir"], progress, stop)
    if rank == 0:
        save_final(model, result, folder)


def train_on_ray(
    model: nn.Module,
    data: DataBundle,
    config: TrainConfig,
    checkpoint_dir: str | Path | None,
    progress: Callable[[dict], None] | None,
    should_stop: Callable[[], bool] | None,
) -> TrainResult:
    """Train `model` in place across `config.nproc` Ray Train workers (see the module docstring)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    if checkpoint_dir is None:
        raise TrainingError("a training across Ray workers needs the job's run folder for its checkpoints")
    workers = _workers.get() or {}
    folder = Path(checkpoint_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name in (STOP_FILE, FINAL_NAME):
        (folder / name).unlink(missing_ok=True)
    buffer = io.BytesIO()
    try:
        torch.save(model.cpu(), buffer)
    except Exception as exc:  # a lambda or a hook of the model's own that pickle cannot send
        raise TrainingError(
            f"this model cannot be sent to training workers ({type(exc).__name__}: {exc}); train it with --nproc 1"
        ) from None
    events = Queue()
    per_worker = dict(workers.get("resources_per_worker") or {"CPU": 1})
    setup = {
        "model": buffer.getvalue(),
        "user_modules": _user_modules(model),
        "data": data,
        "config": config,
        "checkpoint_dir": str(checkpoint_dir),
        "folder": str(folder),
        "events": events,
        "threads": max(1, int(per_worker.get("CPU", 1))),
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=setup,
        scaling_config=ScalingConfig(
            num_workers=config.nproc,
            use_gpu=bool(workers.get("use_gpu")),
            resources_per_worker=per_worker,
            accelerator_type=workers.get("accelerator_type"),
        ),
        run_config=RunConfig(
            storage_path=str(folder),
            name="run",
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    fit.start()
    while fit.is_alive():
        if should_stop is not None and should_stop():
            (folder / STOP_FILE).touch()
        try:
            event = events.get(timeout=0.2)
        except Empty:
            continue
        if progress is not None:
            progress(event)
    while not events.empty():
        event = events.get()
        if progress is not None:
            progress(event)
    error = outcome.get("result") if isinstance(outcome.get("result"), Exception) else None
    if error is not None or not (folder / FINAL_NAME).exists():
        raise TrainingError(
            f"the training across Ray workers failed ({type(error).__name__}: {str(error).strip().splitlines()[-1]})"
            if error is not None
            else "the training across Ray workers ended without its result"
        ) from None
    return load_final(model, folder)


def _fit(trainer) -> object:
    try:
        return trainer.fit()
    except Exception as exc:  # reported by the caller's thread
        return exc
