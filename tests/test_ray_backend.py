"""Jobs and studies on a real local Ray cluster (`ray start --head`, 2 CPUs): the store stays the one record."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sosp_engine.experiments.procedures import ExperimentConfig
from sosp_engine.runs.jobs import Placement, cancel, mark_stale_jobs, resume, submit, submit_study
from sosp_engine.runs.work import read_log
from sosp_engine.nets import build_model
from sosp_engine.runs.backends.ray import BackendError
from sosp_engine.runs.store import Store
from sosp_engine.experiments.studies import StudyConfig, study_cells
from test_jobs import wait_for

ray = pytest.importorskip("ray")
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port()
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--num-gpus",
            "0",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield Placement("ray", f"127.0.0.1:{port}", str(tmp_path_factory.mktemp("shared")))
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def drained_until(store, job_id, predicate, timeout=240):
    """The dashboard's loop: drain the cluster's events into the store until the job's record says `predicate`."""

    def drained(_):
        mark_stale_jobs(store)
        return predicate(store.job(job_id))

    wait_for(store, job_id, drained, timeout)
    return store.job(job_id)


def job_config(epochs=2, **kw):
    return ExperimentConfig(
        procedure="train", model_spec="resnet20", epochs=epochs, batch_size=32, device="cpu", **kw
    )


def test_a_job_on_the_cluster_finishes_and_its_metrics_reach_the_store(tmp_path, cluster):
    store = Store(tmp_path)
    job_id = submit(store, job_config(data_spec="synthetic:3,8,8:10"), placement=cluster)
    # another process (a restarted dashboard, the CLI) finds the running job by its id and drains it
    for _ in range(60):
        out = subprocess.run(
            [sys.executable, "-m", "sosp_engine", "jobs", "show", job_id, "--workspace", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).parent.parent,
        )
        if '"status": "done"' in out.stdout or '"status": "failed"' in out.stdout:
            break
    job = store.job(job_id)
    assert job["status"] == "done", (job["error"], read_log(store, job_id))
    assert job["backend"] == "ray" and job["node"] and job["run_dir"].startswith(cluster.artifacts)
    assert [(m["stage"], m["epoch"]) for m in store.metrics(job_id)] == [("train", 1), ("train", 2)]
    assert (Path(job["run_dir"]) / "trained.pt").exists() and store.models()[0]["job_id"] == job_id
    assert "epoch 2/2" in read_log(store, job_id)


def test_a_job_cancelled_mid_epoch_on_the_cluster_is_cancelled(tmp_path, cluster):
    store = Store(tmp_path)
    job_id = submit(store, job_config(epochs=50), placement=cluster)
    drained_until(store, job_id, lambda j: j["status"] == "running" and 0 < j["progress"])
    assert cancel(store, job_id) == "cancel requested"
    job = drained_until(store, job_id, lambda j: j["status"] in ("cancelled", "done", "failed"))
    assert job["status"] == "cancelled" and "cancelled during train" in job["message"]
    assert len(store.metrics(job_id)) < 50


def test_a_worker_killed_mid_epoch_leaves_the_job_failed_and_resumable_with_each_epoch_once(
    tmp_path, cluster
):
    store = Store(tmp_path)
    job_id = submit(store, job_config(epochs=4), placement=cluster)
    job = drained_until(store, job_id, lambda j: len(store.metrics(job_id)) >= 1)
    os.kill(job["pid"], signal.SIGKILL)  # the worker process running the job's task
    job = drained_until(store, job_id, lambda j: j["status"] != "running")
    assert job["status"] == "failed" and "was lost" in job["error"]
    resume(store, job_id)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"))
    assert job["status"] == "done", job["error"]
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == [1, 2, 3, 4]


def test_a_study_of_four_cells_runs_two_at_a_time_on_two_cpus(tmp_path, cluster):
    store = Store(tmp_path)
    weights = tmp_path / "init.pt"
    torch.manual_seed(0)
    torch.save(build_model("resnet20", 10, 1).state_dict(), weights)
    config = StudyConfig(
        model_spec="resnet20",
        methods=["magnitude", "random"],
        targets=[0.3, 0.6],
        seeds=[0],
        weights=str(weights),
        finetune_epochs=1,
        samples=50,
        device="cpu",
    )
    job_id = submit_study(store, config, placement=cluster)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"), timeout=400)
    assert job["status"] == "done", (job["error"], read_log(store, job_id))
    cells = study_cells(job)
    assert len(cells) == 4 and all(c["node"] for c in cells)
    moments = sorted([(c["started"], 1) for c in cells] + [(c["finished"], -1) for c in cells])
    running, most = 0, 0
    for _, change in moments:
        running += change
        most = max(most, running)
    assert most == 2


def test_a_study_trains_its_seeds_in_parallel_and_their_epochs_reach_the_store(tmp_path, cluster):
    store = Store(tmp_path)
    config = StudyConfig(
        model_spec="resnet20",
        data_spec="synthetic:3,8,8:10",
        methods=["magnitude"],
        targets=[0.5],
        seeds=[0, 1],
        epochs=2,
        finetune_epochs=0,
        samples=20,
        batch_size=64,
        device="cpu",
    )
    job_id = submit_study(store, config, placement=cluster)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"), timeout=400)
    assert job["status"] == "done", (job["error"], read_log(store, job_id))
    stages = sorted((m["stage"], m["epoch"]) for m in store.metrics(job_id) if m["stage"].startswith("train"))
    assert stages == [("train-seed0", 1), ("train-seed0", 2), ("train-seed1", 1), ("train-seed1", 2)]
    assert set(job["result"]["trained"]) == {"seed0", "seed1"}


def test_an_expand_study_fans_its_runs_out_and_their_epochs_reach_the_store(tmp_path, cluster):
    from sosp_engine.experiments.expand_study import ExpandStudyConfig, expand_state
    from sosp_engine.runs.jobs import submit_expand_study

    store = Store(tmp_path)
    config = ExpandStudyConfig(
        model_spec="resnet20:widths=4,8,16",
        data_spec="synthetic:3,8,8:10",
        procedures=["train-prune", "widen-prune"],
        trials=2,
        epochs=1,
        finetune_epochs=1,
        samples=20,
        batch_size=64,
        device="cpu",
    )
    job_id = submit_expand_study(store, config, placement=cluster)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"), timeout=400)
    assert job["status"] == "done", (job["error"], read_log(store, job_id))
    state = expand_state(job)
    assert len(state["runs"]) == 4 and all(r["node"] for r in state["runs"]) and state["plan"]["widen"]
    stages = {m["stage"] for m in store.metrics(job_id) if m["stage"] != "run"}
    assert {
        "train-prune/trial0 train",
        "train-prune/trial1 train",
        "widen-prune/trial0 train",
        "widen-prune/trial1 finetune",
    } <= stages


def test_a_lost_job_host_fails_the_job_with_the_reason_and_resume_runs_it_again(tmp_path, cluster):
    store = Store(tmp_path)
    job_id = submit(store, job_config(epochs=3, data_spec="synthetic:3,8,8:10"), placement=cluster)
    drained_until(store, job_id, lambda j: j["status"] == "running")
    ray.kill(ray.get_actor(f"job-{job_id}", namespace="sosp-lab"))  # as when the node holding it goes away
    job = drained_until(store, job_id, lambda j: j["status"] != "running")
    assert job["status"] == "failed" and "lost" in job["error"] and "resume" in job["error"]
    resume(store, job_id)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"))
    assert job["status"] == "done", job["error"]
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == [1, 2, 3]


def test_an_unreachable_cluster_is_a_clear_error_at_submit(tmp_path):
    with pytest.raises(BackendError, match="cannot reach the Ray cluster"):
        submit(Store(tmp_path), job_config(), placement=Placement("ray", f"127.0.0.1:{free_port()}"))
    assert Store(tmp_path).jobs() == []


def test_jobs_of_an_unreachable_cluster_keep_their_state_and_say_why(tmp_path):
    store = Store(tmp_path)
    job_id = store.add_job("train", "remote", job_config().__dict__, "ray", f"127.0.0.1:{free_port()}")
    store.update_job(job_id, status="running")
    assert mark_stale_jobs(store) == []
    job = store.job(job_id)
    assert job["status"] == "running" and "no news from the cluster" in job["message"]
