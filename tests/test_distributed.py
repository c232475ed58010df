"""One training across processes (DistributedDataParallel, gloo on CPU): same result as one process, rank 0 writes."""

import os
import signal

import pytest
import torch
from torch import nn

from sosp_engine.nets.data import load_data
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.experiments.procedures import ExperimentConfig
from sosp_engine.runs.jobs import mark_stale_jobs, resume, submit
from sosp_engine.nets import build_model
from sosp_engine.runs.store import Store
from sosp_engine.experiments.trainer import train
from sosp_engine.experiments.training import CHECKPOINT_NAME, TrainConfig, TrainingError
from test_jobs import wait_for

DATA = "synthetic:3,8,8:10"  # no augmentation: both runs see the same pixels


def no_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.0), nn.Linear(8 * 64, 10)
    )


def config(nproc: int, epochs: int = 1, **kw) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=0.05, batch_size=50, device="cpu", nproc=nproc, **kw)


def test_two_processes_equal_one_process_with_the_same_global_batch():
    data = load_data(DATA)
    alone, shared = no_bn_net(), no_bn_net()
    one = train(alone, data, config(1))
    two = train(shared, data, config(2))  # 256 samples in batches of 50: the uneven last batch is split too
    for p, q in zip(alone.parameters(), shared.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert two.history[0].train_loss == pytest.approx(one.history[0].train_loss, rel=1e-6)
    assert two.history[0].train_acc == one.history[0].train_acc and two.test_acc == one.test_acc


def test_rank_zero_alone_reports_and_writes_the_checkpoint_once_per_epoch(tmp_path, user_model_spec):
    data = load_data(DATA)
    model = build_model(user_model_spec, 10, 3)  # a user-code model: the workers load its file first
    events = []
    result = train(model, data, config(2, epochs=2), tmp_path, events.append)
    assert [e["epoch"] for e in events if e["phase"] == "epoch"] == [1, 2]
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))
    for key, value in model.state_dict().items():  # the caller's model holds the trained weights
        torch.testing.assert_close(value, state["model"][key])
    assert [h.epoch for h in result.history] == [1, 2]


def test_a_cancelled_distributed_run_resumes_from_its_checkpoint_with_each_epoch_once(tmp_path):
    data = load_data(DATA)
    events = []
    stop = lambda: any(e["phase"] == "epoch" for e in events)  # noqa: E731 - cancel right after the first epoch
    first = train(no_bn_net(), data, config(2, epochs=3), tmp_path, events.append, stop)
    assert first.cancelled and [h.epoch for h in first.history] == [1]
    rest = train(no_bn_net(), data, config(2, epochs=3), tmp_path)
    assert not rest.cancelled and [h.epoch for h in rest.history] == [1, 2, 3]


def test_sync_bn_on_cpu_is_a_clear_error_before_any_process_starts():
    with pytest.raises(TrainingError, match="SyncBatchNorm has no CPU kernel"):
        train(no_bn_net(), load_data(DATA), config(2, sync_bn=True))


def test_sync_bn_without_several_processes_is_refused():
    with pytest.raises(TrainingError, match="--nproc 2 or more"):
        config(1, sync_bn=True).validate()


def test_a_failing_worker_becomes_the_callers_error():
    with pytest.raises(TrainingError, match="the training loss became nan"):
        train(
            no_bn_net(), load_data(DATA), TrainConfig(epochs=1, lr=1e30, batch_size=50, device="cpu", nproc=2)
        )


def training_job_past_its_first_epoch(tmp_path, epochs: int) -> tuple[Store, str, dict]:
    """A 2-process training job of ResNet-20 in a fresh workspace, once its first epoch is recorded."""
    store = Store(tmp_path)
    config = config_from_dict(
        ExperimentConfig,
        dict(
            procedure="train",
            model_spec="resnet20",
            data_spec=DATA,
            epochs=epochs,
            batch_size=32,
            device="cpu",
            nproc=2,
        ),
    )
    job_id = submit(store, config)
    return store, job_id, wait_for(store, job_id, lambda j: len(store.metrics(j["id"])) >= 1)


def test_a_killed_distributed_job_resumes_with_each_epoch_recorded_once(tmp_path):
    store, job_id, job = training_job_past_its_first_epoch(tmp_path, epochs=4)
    workers = [int(p) for p in os.popen(f"pgrep -P {job['pid']}").read().split()]
    os.kill(job["pid"], signal.SIGKILL)
    wait_for(store, job_id, lambda j: bool(mark_stale_jobs(store)) or j["status"] == "failed", timeout=60)
    for pid in workers:  # the training processes die with their controller
        wait_for(
            store,
            job_id,
            lambda j: (
                not os.path.exists(f"/proc/{pid}")
                or open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
            ),
            timeout=30,
        )
    resume(store, job_id)
    job = wait_for(store, job_id, lambda j: j["status"] in ("done", "failed"))
    assert job["status"] == "done", job["error"]
    epochs = sorted(m["epoch"] for m in store.metrics(job_id))
    assert epochs == [1, 2, 3, 4]


def test_a_killed_rank_is_named_before_the_ranks_that_lost_their_peer():
    from sosp_engine.experiments.distributed import failure_message

    message = failure_message([(0, "DistBackendError", "Connection closed by peer")], [1, -9])
    assert message.startswith("training process 1 of the distributed run was killed (signal 9)")
    assert "process 0: DistBackendError" in message and "resume" in message


def test_a_rank_that_reports_its_own_error_is_named_with_it():
    from sosp_engine.experiments.distributed import failure_message

    assert failure_message([(1, "RuntimeError", "boom")], [1, 1]) == (
        "training process 1 of the distributed run failed: RuntimeError: boom"
    )


def test_a_distributed_job_whose_rank_1_is_killed_names_rank_1(tmp_path):
    store, job_id, job = training_job_past_its_first_epoch(tmp_path, epochs=20)
    children = [int(p) for p in os.popen(f"pgrep -P {job['pid']}").read().split()]
    ranks = sorted(p for p in children if b"resource_tracker" not in open(f"/proc/{p}/cmdline", "rb").read())
    os.kill(ranks[1], signal.SIGKILL)
    job = wait_for(store, job_id, lambda j: j["status"] in ("failed", "done"), timeout=120)
    assert job["status"] == "failed"
    assert "training process 1 of the distributed run was killed (signal 9)" in job["error"], job["error"]
