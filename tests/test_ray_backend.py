"""Jobs and studies on a real local Ray cluster (`ray start --head`, 2 CPUs): the store stays the one record. The
test process never connects to Ray itself (the engine's bridge does), so a restarted head cannot take it down."""

import dataclasses
import os
import signal
from contextlib import contextmanager
import time
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sosp_engine.experiments.procedures import ExperimentConfig
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.runs.jobs import Placement, cancel, mark_stale_jobs, resume, submit, submit_study
from sosp_engine.runs.work import read_log
from sosp_engine.nets import build_model
from sosp_engine.runs.backends.ray import BackendError
from sosp_engine.runs.store import Store
from sosp_engine.experiments.studies import StudyConfig
from sosp_engine.runs.study_state import study_cells
from conftest import wait_for_state
from test_jobs import wait_for

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """This module's own Ray head (`ray start --block` in a process group of its own): stopping it, or crashing it as
    a head node crashes, touches no other Ray cluster on the machine."""

    def __init__(self, port: int) -> None:
        self.port, self.proc = port, None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--port", str(self.port), "--num-cpus", "2", "--num-gpus", "0"]
            + ["--include-dashboard", "false", "--disable-usage-stats", "--block"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        probe = f"import ray\nray.init(address='127.0.0.1:{self.port}', logging_level='ERROR')\nprint(len(ray.nodes()))"
        wait_until(
            lambda: (
                subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode
                == 0
            ),
            timeout=180,
        )

    def crash(self) -> None:
        """Kill the head's every process at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


HEADS: dict[str, Head] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port()
    head = Head(port)
    head.start()
    address = f"127.0.0.1:{port}"
    HEADS[address] = head
    try:
        yield Placement("ray", address, str(tmp_path_factory.mktemp("shared")))
    finally:
        head.crash()


def on_cluster(cluster, code: str, ship_engine: bool = False) -> str:
    """Run `code` (with `ray` connected to the cluster, shipping the engine to the workers if asked) in a process of
    its own; returns what it printed."""
    env = f"runtime_env={{'py_modules': [{str(ROOT / 'sosp_engine')!r}]}}" if ship_engine else ""
    script = (
        f"import ray\nray.init(address={cluster.address!r}, namespace='sosp-lab', logging_level='ERROR', {env})\n"
        f"{code}"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def restart_head(cluster) -> None:
    """Crash the cluster's head and start a fresh one at the same address, as after a crash of the head node."""
    head = HEADS[cluster.address]
    head.crash()
    head.start()


def initial_weights(folder: Path) -> Path:
    """Seeded ResNet-20 weights, so a study's cells need no training."""
    weights = folder / "init.pt"
    torch.manual_seed(0)
    torch.save(build_model("resnet20", 10, 1).state_dict(), weights)
    return weights


def events_on_disk(job: dict, kind: str) -> list[dict]:
    """The job's events of `kind` as its run folder holds them (nobody has read them into the store)."""
    from sosp_engine.runs.events import new_events
    from sosp_engine.runs.store import run_folder

    return [e for e in new_events(run_folder(job), {})[0] if e["kind"] == kind]


def wait_until(predicate, timeout=240):
    wait_for_state(predicate, timeout, lambda: f"not reached in {timeout} load-scaled seconds")


def drained_until(store, job_id, predicate, timeout=240):
    """The dashboard's loop: drain the cluster's events into the store until the job's record says `predicate`."""

    def drained(_):
        mark_stale_jobs(store)
        return predicate(store.job(job_id))

    wait_for(store, job_id, drained, timeout)
    return store.job(job_id)


def job_config(epochs=2, **kw):
    return config_from_dict(
        ExperimentConfig,
        dict(procedure="train", model_spec="resnet20", epochs=epochs, batch_size=32, device="cpu", **kw),
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


def test_a_worker_killed_mid_epoch_is_retried_and_the_job_finishes_with_each_epoch_once(tmp_path, cluster):
    store = Store(tmp_path)
    job_id = submit(store, job_config(epochs=4), placement=cluster)
    job = drained_until(store, job_id, lambda j: len(store.metrics(job_id)) >= 1)
    os.kill(job["pid"], signal.SIGKILL)  # the worker process running the job's task
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"))
    assert job["status"] == "done", job["error"]  # no resume: Ray ran the task again
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == [1, 2, 3, 4]
    assert len(events_on_disk(job, "start")) == 2


def test_a_worker_killed_with_no_retries_left_fails_the_job_saying_resume(tmp_path, cluster, monkeypatch):
    monkeypatch.setenv("SOSP_RAY_MAX_RETRIES", "0")
    store = Store(tmp_path)
    job_id = submit(store, job_config(epochs=4), placement=cluster)
    job = drained_until(store, job_id, lambda j: len(store.metrics(job_id)) >= 1)
    os.kill(job["pid"], signal.SIGKILL)
    job = drained_until(store, job_id, lambda j: j["status"] != "running")
    assert job["status"] == "failed" and "was lost" in job["error"] and "resume" in job["error"]
    resume(store, job_id)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"))
    assert job["status"] == "done", job["error"]
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == [1, 2, 3, 4]


def test_a_study_of_four_cells_runs_two_at_a_time_on_two_cpus(tmp_path, cluster):
    store = Store(tmp_path)
    weights = initial_weights(tmp_path)
    config = config_from_dict(
        StudyConfig,
        dict(
            model_spec="resnet20",
            methods=["magnitude", "random"],
            targets=[0.3, 0.6],
            seeds=[0],
            weights=str(weights),
            finetune_epochs=1,
            samples=50,
            device="cpu",
        ),
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
    config = config_from_dict(
        StudyConfig,
        dict(
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
        ),
    )
    job_id = submit_study(store, config, placement=cluster)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"), timeout=400)
    assert job["status"] == "done", (job["error"], read_log(store, job_id))
    stages = sorted((m["stage"], m["epoch"]) for m in store.metrics(job_id) if m["stage"].startswith("train"))
    assert stages == [("train-seed0", 1), ("train-seed0", 2), ("train-seed1", 1), ("train-seed1", 2)]
    assert set(job["result"]["trained"]) == {"seed0", "seed1"}


def test_a_study_whose_unit_worker_is_killed_retries_it_and_finishes_without_a_resume(tmp_path, cluster):
    store = Store(tmp_path)
    config = config_from_dict(
        StudyConfig,
        dict(
            model_spec="resnet20",
            methods=["magnitude"],
            targets=[0.5],
            seeds=[0, 1],
            epochs=3,
            finetune_epochs=0,
            samples=20,
            device="cpu",
        ),
    )
    job_id = submit_study(store, config, placement=cluster)
    job = store.job(job_id)
    wait_until(lambda: events_on_disk(job, "metrics"))  # a unit is training
    victim = events_on_disk(job, "unit-start")[0]["payload"]["pid"]
    os.kill(victim, signal.SIGKILL)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"), timeout=400)
    assert job["status"] == "done", (job["error"], read_log(store, job_id))
    stages = sorted((m["stage"], m["epoch"]) for m in store.metrics(job_id) if m["stage"].startswith("train"))
    assert stages == [(f"train-seed{s}", e) for s in (0, 1) for e in (1, 2, 3)]
    assert len(study_cells(job)) == 2


def test_an_expand_study_fans_its_runs_out_and_their_epochs_reach_the_store(tmp_path, cluster):
    from sosp_engine.experiments.expand_study import ExpandStudyConfig
    from sosp_engine.runs.study_state import expand_state
    from sosp_engine.runs.jobs import submit_expand_study

    store = Store(tmp_path)
    config = config_from_dict(
        ExpandStudyConfig,
        dict(
            model_spec="resnet20:widths=4,8,16",
            data_spec="synthetic:3,8,8:10",
            procedures=["train-prune", "widen-prune"],
            trials=2,
            epochs=1,
            finetune_epochs=1,
            samples=20,
            batch_size=64,
            device="cpu",
        ),
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


KILLER = """
import pathlib, time
import ray
ray.init(address={address!r}, namespace='sosp-lab', logging_level='ERROR')
print('connected', flush=True)
order = pathlib.Path({order!r})
while not order.exists():
    time.sleep(0.02)
ray.kill(ray.get_actor(order.read_text()))
"""


def test_a_lost_job_host_fails_the_job_with_the_reason_and_resume_runs_it_again(tmp_path, cluster):
    store = Store(tmp_path)
    # The kill, as when the node holding the job goes away, comes from a driver connected beforehand: a driver
    # started after the first epoch (seconds on a loaded machine) could land after the job's last epoch.
    order = tmp_path / "kill"
    killer = subprocess.Popen(
        [sys.executable, "-c", KILLER.format(address=cluster.address, order=str(order))],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert killer.stdout.readline().strip() == "connected"
    job_id = submit(store, job_config(epochs=10), placement=cluster)
    drained_until(store, job_id, lambda j: len(store.metrics(job_id)) >= 1)
    (tmp_path / "kill.tmp").write_text(f"job-{job_id}")
    (tmp_path / "kill.tmp").rename(order)
    assert killer.wait(timeout=600) == 0
    job = drained_until(store, job_id, lambda j: j["status"] != "running", timeout=120)
    assert job["status"] == "failed" and "lost" in job["error"] and "resume" in job["error"]
    resume(store, job_id)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"))
    assert job["status"] == "done", job["error"]
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == list(range(1, 11))


def test_an_unreachable_cluster_is_a_clear_error_at_submit(tmp_path):
    with pytest.raises(BackendError, match="cannot reach the Ray cluster"):
        submit(Store(tmp_path), job_config(), placement=Placement("ray", f"127.0.0.1:{free_port()}"))
    assert Store(tmp_path).jobs() == []


def test_jobs_of_an_unreachable_cluster_keep_their_state_and_say_why(tmp_path):
    store = Store(tmp_path)
    job_id = store.add_job(
        "train", "remote", dataclasses.asdict(job_config()), "ray", f"127.0.0.1:{free_port()}"
    )
    store.update_job(job_id, status="running", heartbeat=time.time() - 100)  # silent: the cluster is asked
    assert mark_stale_jobs(store) == []
    job = store.job(job_id)
    assert job["status"] == "running" and "no news from the cluster" in job["message"]


# --- a second node: one training across nodes; a node that does not share the storage -----------------------------
@contextmanager
def second_node(cluster, private_artifacts: bool = False):
    """A second node of the cluster on this machine (1 CPU); with `private_artifacts` it sees an empty folder where
    the artifacts are (a mount namespace of its own)."""
    start = f"{RAY} start --address {cluster.address} --num-cpus 1 --num-gpus 0 --block --disable-usage-stats"
    if private_artifacts:
        if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
            pytest.skip("needs unshare --mount (root in a mount namespace) to give a node storage of its own")
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs none {cluster.artifacts} && exec {start}",
        ]
    else:
        command = start.split()
    node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    alive = "print(sum(n['Alive'] for n in ray.nodes()))"
    try:
        wait_until(lambda: on_cluster(cluster, alive).strip() == "2", timeout=120)
        yield
    finally:
        node.terminate()
        node.wait(timeout=60)
        wait_until(lambda: on_cluster(cluster, alive).strip() == "1", timeout=120)


@pytest.fixture
def node_without_the_artifacts(cluster):
    with second_node(cluster, private_artifacts=True):
        yield


@pytest.fixture
def two_nodes(cluster):
    with second_node(cluster):
        yield


RAY_TRAIN = """
import torch
from torch import nn
from sosp_engine.nets.data import load_data
from sosp_engine.experiments.ray_training import workers_of_this_job
from sosp_engine.experiments.trainer import train
from sosp_engine.experiments.training import TrainConfig

@ray.remote(num_cpus=1)
def training(checkpoints):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    config = TrainConfig(epochs=2, lr=0.05, batch_size=50, device="cpu", nproc=2)
    with workers_of_this_job({"use_gpu": False, "resources_per_worker": {"CPU": 1}}):
        result = train(model, load_data("synthetic:3,8,8:10"), config, checkpoints)
    return model.state_dict(), [h.train_loss for h in result.history]

weights, losses = ray.get(training.remote(CHECKPOINTS))
torch.save({"weights": weights, "losses": losses}, OUT)
"""


def test_two_ray_train_workers_on_two_nodes_equal_one_process(tmp_path, cluster, two_nodes):
    from sosp_engine.experiments.trainer import train
    from sosp_engine.experiments.training import TrainConfig
    from sosp_engine.nets.data import load_data

    out, checkpoints = tmp_path / "ray.pt", Path(cluster.artifacts) / "ray-train-test"
    code = RAY_TRAIN.replace("CHECKPOINTS", repr(str(checkpoints))).replace("OUT", repr(str(out)))
    on_cluster(cluster, code, ship_engine=True)
    on_ray = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    alone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    one = train(
        alone, load_data("synthetic:3,8,8:10"), TrainConfig(epochs=2, lr=0.05, batch_size=50, device="cpu")
    )
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(on_ray["weights"][key], value, rtol=1e-5, atol=1e-6)
    assert on_ray["losses"] == pytest.approx([h.train_loss for h in one.history], rel=1e-6)
    assert (checkpoints / "last.pt").exists()  # rank 0's epoch checkpoints, on the shared storage
    kept = list((checkpoints / "ray-train").rglob("checkpoint_*/last.pt"))
    assert len(kept) == 1  # Ray Train's copy of the latest one


def test_a_job_training_across_two_nodes_finishes_with_each_epoch_once(tmp_path, cluster, two_nodes):
    store = Store(tmp_path)
    job_id = submit(store, job_config(epochs=2, data_spec="synthetic:3,8,8:10", nproc=2), placement=cluster)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"), timeout=400)
    assert job["status"] == "done", (job["error"], read_log(store, job_id))
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == [1, 2]
    assert (Path(job["run_dir"]) / "train" / "ray-train").is_dir()


def test_a_resource_no_node_offers_is_refused_with_what_the_cluster_has(tmp_path, cluster):
    store = Store(tmp_path)
    where = Placement("ray", cluster.address, cluster.artifacts, accelerator_type="H100")
    job_id = submit(store, job_config(), placement=where)
    job = store.job(job_id)
    assert (
        job["status"] == "failed" and "no node of the Ray cluster has accelerator type 'H100'" in job["error"]
    )


def test_a_cluster_node_that_does_not_share_the_artifacts_folder_is_refused_at_submit(
    tmp_path, cluster, node_without_the_artifacts
):
    store = Store(tmp_path)
    with pytest.raises(BackendError, match="does not share the artifacts folder"):
        submit(store, job_config(data_spec="synthetic:3,8,8:10"), placement=cluster)
    assert store.jobs() == []


def test_a_data_path_a_node_cannot_see_is_refused_at_submit_naming_it(
    tmp_path, cluster, node_without_the_artifacts
):
    data = Path(cluster.artifacts) / "digits-copy"  # under the folder the second node sees empty
    data.mkdir()
    store = Store(tmp_path)
    with pytest.raises(BackendError, match="cannot see .*digits-copy"):
        submit(store, job_config(data_spec=f"imagefolder:{data}"), placement=cluster)
    assert store.jobs() == []


# --- a head restart with nobody watching loses nothing (these restart the cluster: they run last) ------------------
def test_a_head_restart_during_a_job_with_nobody_watching_loses_no_epoch(tmp_path, cluster):
    store = Store(tmp_path)
    job_id = submit(store, job_config(epochs=40), placement=cluster)
    job = store.job(job_id)
    wait_until(lambda: len(events_on_disk(job, "metrics")) >= 2)  # nobody reads them into the store meanwhile
    restart_head(cluster)
    written = sorted(e["payload"]["epoch"] for e in events_on_disk(job, "metrics"))
    job = drained_until(store, job_id, lambda j: j["status"] != "running", timeout=120)
    assert job["status"] == "failed" and "resume" in job["error"]
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == written  # each epoch written, once
    mark_stale_jobs(store)
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == written  # read again: still once


def test_a_head_restart_right_after_a_job_loses_none_of_its_epochs(tmp_path, cluster):
    store = Store(tmp_path)
    job_id = submit(store, job_config(epochs=3, data_spec="synthetic:3,8,8:10"), placement=cluster)
    job = store.job(job_id)
    wait_until(lambda: events_on_disk(job, "end"))
    restart_head(cluster)  # nobody has read the job's events yet
    job = drained_until(store, job_id, lambda j: j["status"] != "running", timeout=60)
    assert job["status"] == "done", job["error"]
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == [1, 2, 3]
    assert store.models()[0]["job_id"] == job_id


def runs_page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app" / "dashboard.py"), default_timeout=240)
    at.run()
    return at.switch_page("../pages/runs.py").run()


def test_the_runs_page_survives_a_head_restart_and_resumes_the_job_there(tmp_path, cluster, monkeypatch):
    monkeypatch.setenv("SOSP_WORKSPACE", str(tmp_path))
    store = Store(tmp_path)
    job_id = submit(store, job_config(epochs=6), placement=cluster)
    wait_until(lambda: events_on_disk(store.job(job_id), "metrics"))
    restart_head(
        cluster
    )  # the engine's connection, held since the submit, now points at a cluster that is gone
    at = runs_page()
    assert not at.exception, at.exception
    job = drained_until(store, job_id, lambda j: j["status"] != "running", timeout=120)
    assert job["status"] == "failed" and "resume" in job["error"]
    at = runs_page()
    resume_button = [b for b in at.button if b.label == "Resume"]
    assert resume_button, ([b.label for b in at.button], [e.value for e in at.error], at.exception)
    resume_button[0].click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"))
    assert job["status"] == "done", job["error"]
    assert sorted(m["epoch"] for m in store.metrics(job_id)) == [1, 2, 3, 4, 5, 6]


def test_a_head_restart_during_a_study_loses_no_cell_and_resume_redoes_none(tmp_path, cluster):
    store = Store(tmp_path)
    weights = initial_weights(tmp_path)
    config = config_from_dict(
        StudyConfig,
        dict(
            model_spec="resnet20",
            methods=["magnitude", "random"],
            targets=[0.3, 0.5, 0.7],
            seeds=[0],
            weights=str(weights),
            finetune_epochs=2,
            samples=50,
            device="cpu",
        ),
    )
    job_id = submit_study(store, config, placement=cluster)
    job = store.job(job_id)
    from sosp_engine.runs.study_state import study_state

    wait_until(lambda: study_state(job).get("cells"), timeout=400)  # a cell is done; nobody has looked
    restart_head(cluster)
    before = {
        c["cell"] if "cell" in c else (c["method"], c["target"]): c["finished"] for c in study_cells(job)
    }
    job = drained_until(store, job_id, lambda j: j["status"] != "running", timeout=120)
    assert job["status"] == "failed" and "resume" in job["error"]
    resume(store, job_id)
    job = drained_until(store, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"), timeout=600)
    assert job["status"] == "done", (job["error"], read_log(store, job_id))
    after = {
        c["cell"] if "cell" in c else (c["method"], c["target"]): c["finished"] for c in study_cells(job)
    }
    assert len(after) == 6 and all(after[key] == finished for key, finished in before.items())  # none redone
