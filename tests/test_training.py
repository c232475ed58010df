import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import ROOT, random_mask
from sosp_engine.nets.data import load_data
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.pruning.masks import pruned_copy
from sosp_engine.nets import build_model
from sosp_engine.experiments.trainer import train
from sosp_engine.experiments.training import TrainConfig, make_optimizer, make_scheduler

DIGITS = load_data("digits")


def test_resnet20_reaches_95_percent_on_digits():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1)
    result = train(model, DIGITS, TrainConfig(epochs=15, seed=0))
    assert result.test_acc >= 0.95
    assert len(result.history) == 15 and result.history[-1].lr < 0.1


def test_step_schedule_decays_at_60_and_80_percent():
    model = torch.nn.Linear(2, 2)
    config = TrainConfig(epochs=10)
    opt = make_optimizer(model, config)
    sched = make_scheduler(opt, config)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[5] == 0.1 and abs(lrs[6] - 0.01) < 1e-12 and abs(lrs[8] - 0.001) < 1e-12


RUNNER = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})  # the same as this process: float sums depend on it
from sosp_engine.nets.data import load_data
from sosp_engine.nets import build_model
from sosp_engine.experiments.trainer import train
from sosp_engine.experiments.training import TrainConfig
torch.manual_seed(0)
model = build_model("resnet20", 10, 1)
train(model, load_data("digits"), TrainConfig(epochs=4, seed=3), checkpoint_dir={ckpt!r})
"""


def _train_to_end(ckpt: Path | None) -> dict:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1)
    train(model, DIGITS, TrainConfig(epochs=4, seed=3), checkpoint_dir=ckpt)
    return model.state_dict()


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER.format(root=str(ROOT), ckpt=str(ckpt), threads=torch.get_num_threads())]
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (ckpt / "last.pt").exists() and torch.load(ckpt / "last.pt", weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the third epoch
    proc.kill()
    proc.wait()
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] < 4, (
        "the run finished before it was killed"
    )
    resumed = _train_to_end(ckpt)
    uninterrupted = _train_to_end(None)
    for key, value in uninterrupted.items():
        assert torch.equal(value, resumed[key]), key


def test_training_runs_cudnns_deterministic_algorithms_and_gives_the_users_choice_back():
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = False, True  # the user's choice: fast, autotuned
    seen = []
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(math.prod(DIGITS.input_shape), DIGITS.num_classes)
    )
    model[1].register_forward_hook(lambda *_: seen.append((cudnn.deterministic, cudnn.benchmark)))
    try:
        train(model, DIGITS, TrainConfig(epochs=1, device="cpu"))
        after = cudnn.deterministic, cudnn.benchmark
    finally:
        cudnn.deterministic, cudnn.benchmark = saved
    assert seen and set(seen) == {(True, False)}
    assert after == (False, True)


def test_cancellation_stops_at_the_next_batch_and_keeps_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1)
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 15  # 10 batches per epoch: stop inside the second epoch

    result = train(model, DIGITS, TrainConfig(epochs=3), checkpoint_dir=tmp_path, should_stop=should_stop)
    assert result.cancelled and len(calls) == 16
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


def test_a_physically_pruned_model_trains_with_a_fresh_optimizer():
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    smaller = pruned_copy(wb.model, wb.structures, random_mask(wb.structures, 0.5), wb.example)
    before = {k: v.clone() for k, v in smaller.state_dict().items()}
    optimizer = make_optimizer(smaller, TrainConfig())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in smaller.parameters()
    }
    train(smaller, DIGITS, TrainConfig(epochs=1))
    assert not torch.equal(before["conv1.weight"], smaller.state_dict()["conv1.weight"])


def test_train_with_one_seed_twice_gives_the_same_weights(tmp_path):
    from sosp_engine.cli.main import main

    saved = []
    for run in ("a", "b"):
        path = tmp_path / f"{run}.pt"
        args = [
            "train",
            "--model",
            "resnet20:widths=4,8,8",
            "--data",
            "synthetic:3,8,8:3:64",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--seed",
            "7",
            "--device",
            "cpu",
            "--save",
            str(path),
        ]
        assert main(args) == 0
        saved.append(torch.load(path, weights_only=True))
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
