import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_for_state
from sosp_engine.experiments.procedures import ExperimentConfig
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.runs.jobs import cancel, launch_pending, mark_stale_jobs, resume, submit
from sosp_engine.runs.work import read_log
from sosp_engine.errors import SospError
from sosp_engine.runs.store import Store, StoreError


def wait_for(store, job_id, predicate, timeout=180):
    """The job's record once `predicate` holds; `timeout` load-scaled seconds only guard against a hang (a job marked
    failed can still finish: its runner may only have been slow)."""

    def reached():
        job = store.job(job_id)
        return job if predicate(job) else None

    return wait_for_state(
        reached, timeout, lambda: f"job {job_id} stuck: {store.job(job_id)}\n{read_log(store, job_id)}"
    )


def tiny(procedure="train-prune", epochs=1, **kw):
    """A small job's config; `kw` in the flat shape of stored configs (model_spec=..., method=...)."""
    flat = dict(procedure=procedure, model_spec="resnet20", epochs=epochs, finetune_epochs=1, samples=50)
    return config_from_dict(ExperimentConfig, {**flat, **kw})


def test_a_job_runs_in_its_own_process_and_reports_progress(tmp_path):
    store = Store(tmp_path)
    job_id = submit(store, tiny())
    job = wait_for(store, job_id, lambda j: j["status"] in ("done", "failed"))
    assert job["status"] == "done", read_log(store, job_id)
    assert job["progress"] == 1.0 and job["result"]["test_acc"] is not None
    assert {m["stage"] for m in store.metrics(job_id)} == {"train", "finetune"}
    assert "done" in read_log(store, job_id)
    [analysis] = (
        store.analyses()
    )  # the job's analysis opens on the analysis pages, on the job's trained weights
    assert analysis["name"].endswith("(analysis)") and analysis["config"]["setup"]["weights"].endswith(
        "trained.pt"
    )


def test_cancel_stops_a_running_job_and_resume_continues_from_its_checkpoint(tmp_path):
    store = Store(tmp_path)
    job_id = submit(store, tiny("train", epochs=8))
    wait_for(store, job_id, lambda j: len(store.metrics(j["id"])) >= 1)
    assert cancel(store, job_id) == "cancel requested"
    job = wait_for(store, job_id, lambda j: j["status"] in ("cancelled", "done", "failed"))
    assert job["status"] == "cancelled"
    epochs_before = max(m["epoch"] for m in store.metrics(job_id))
    assert epochs_before < 8
    resume(store, job_id)
    job = wait_for(store, job_id, lambda j: j["status"] in ("done", "failed"))
    assert job["status"] == "done", read_log(store, job_id)
    epochs = [m["epoch"] for m in store.metrics(job_id)]
    assert epochs == list(range(1, 9))  # no epoch ran twice: the resumed run started after its checkpoint
    assert store.models() and store.models()[0]["job_id"] == job_id


def test_queued_jobs_wait_for_the_slot_in_order(tmp_path):
    store = Store(tmp_path)
    first = submit(store, tiny("train", epochs=3))
    second = submit(store, tiny("train", epochs=1))
    assert store.job(second)["status"] == "queued"
    assert cancel(store, second) == "cancelled"
    wait_for(store, first, lambda j: j["status"] == "done")


def test_a_job_whose_process_died_is_detected_and_resumable(tmp_path):
    store = Store(tmp_path)
    job_id = store.add_job("train", "dead", dataclasses.asdict(tiny("train", epochs=1)))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update_job(
        job_id, status="running", pid=dead.pid, heartbeat=time.time() - 3600, started=time.time() - 3600
    )
    assert mark_stale_jobs(store) == [job_id]
    assert "process died" in store.job(job_id)["error"]
    resume(store, job_id)
    assert wait_for(store, job_id, lambda j: j["status"] in ("done", "failed"))["status"] == "done"


def test_finished_jobs_cannot_be_cancelled(tmp_path):
    store = Store(tmp_path)
    job_id = store.add_job("train", "t", {})
    store.update_job(job_id, status="done")
    with pytest.raises(StoreError, match="only queued or running"):
        cancel(store, job_id)
    assert launch_pending(store) == []


def test_jobs_cli_submits_lists_shows_and_logs(tmp_path, capsys):
    import json

    from sosp_engine.cli.main import main

    ws = str(tmp_path / "ws")
    assert (
        main(
            [
                "jobs",
                "submit",
                "--procedure",
                "train",
                "--model",
                "resnet20",
                "--epochs",
                "1",
                "--name",
                "cli job",
                "--workspace",
                ws,
            ]
        )
        == 0
    )
    job_id = json.loads(capsys.readouterr().out)["job"]
    job = wait_for(Store(ws), job_id, lambda j: j["status"] in ("done", "failed"))
    assert job["status"] == "done"
    assert main(["jobs", "list", "--workspace", ws]) == 0
    assert f"{job_id}  done" in capsys.readouterr().out
    assert main(["jobs", "show", job_id, "--workspace", ws]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"][0]["epoch"] == 1
    assert main(["jobs", "logs", job_id, "--workspace", ws]) == 0 and "done" in capsys.readouterr().out
    assert main(["jobs", "delete", job_id, "--workspace", ws]) == 2  # needs --yes
    assert main(["jobs", "delete", job_id, "--yes", "--workspace", ws]) == 0 and Store(ws).jobs() == []


def test_a_finished_job_process_is_reaped_not_left_as_a_zombie(tmp_path):
    store = Store(tmp_path)
    job_id = submit(store, tiny("train", epochs=1))
    wait_for(store, job_id, lambda j: j["status"] == "done")
    pid = store.job(job_id)["pid"]
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0]
        except OSError:
            return  # gone: reaped
        time.sleep(0.2)
    raise AssertionError(f"job process {pid} is still a zombie (state {state})")


def test_an_unknown_stage_to_widen_is_refused_at_submit_with_the_valid_names(tmp_path):
    from sosp_engine.errors import ModelSpecError

    store = Store(tmp_path)
    with pytest.raises(ModelSpecError, match=r"stages: \['stage 1 \(16x16\)'"):
        submit(store, tiny("expand-prune", widen={"stage 2 (16x16)": 2.0}))
    assert store.jobs() == []


def test_a_long_queued_job_being_launched_is_not_taken_for_a_dead_one(tmp_path):
    store = Store(tmp_path)
    job_id = store.add_job("train", "old", dataclasses.asdict(tiny("train", epochs=1)))
    store.update_job(job_id, created=time.time() - 3600, heartbeat=time.time() - 3600)
    [claimed] = store.claim_queued_jobs(1)  # a launcher has claimed it and not yet started its process
    assert claimed["id"] == job_id and mark_stale_jobs(store) == []
    assert store.job(job_id)["status"] == "starting"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_spec": "nosuchnet"}, "nosuchnet"),
        ({"data_spec": "cifar10:/nonexistent"}, "/nonexistent"),
        ({"weights": "/nonexistent.pt"}, "/nonexistent.pt"),
    ],
)
def test_a_job_with_a_bad_model_data_or_weights_is_refused_at_submit(tmp_path, change, message):
    store = Store(tmp_path)
    with pytest.raises(SospError, match=message):
        submit(store, tiny("train-prune", **change))
    assert store.jobs() == []


def test_a_killed_job_process_fails_its_job_at_once_with_the_reason(tmp_path):
    store = Store(tmp_path)
    job_id = submit(store, tiny("train", epochs=6))
    job = wait_for(store, job_id, lambda j: j["status"] == "running" and j["pid"])
    os.kill(job["pid"], signal.SIGKILL)
    job = wait_for(
        store, job_id, lambda j: j["status"] == "failed", timeout=10
    )  # well before the 20 s stale check
    assert "killed by signal 9" in job["error"] and "resume" in job["error"]
    resume(store, job_id)
    assert wait_for(store, job_id, lambda j: j["status"] in ("done", "failed"))["status"] == "done"


KILL_AFTER_CHECKPOINT = '''
import os, signal
from pathlib import Path

import sosp_engine.experiments.training as training

_save = training.save_atomically


def _save_then_die(obj, path, **options):
    """Publish the epoch's checkpoint, then die before anything else runs: once per epoch listed in the mark."""
    out = _save(obj, path, **options)
    mark = Path(os.environ["SOSP_TEST_KILL_MARK"])
    if Path(path).name == "last.pt" and str(obj["epoch"]) in os.environ["SOSP_TEST_KILL_EPOCHS"].split(","):
        done = mark.with_name(f"{mark.name}.{obj['epoch']}")
        if not done.exists():
            done.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return out


training.save_atomically = _save_then_die
'''


def test_kills_right_after_an_epochs_checkpoint_lands_lose_no_epoch_and_record_none_twice(
    tmp_path, monkeypatch
):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        KILL_AFTER_CHECKPOINT
    )  # runs in the job's process, before its work
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("SOSP_TEST_KILL_MARK", str(tmp_path / "killed"))
    monkeypatch.setenv("SOSP_TEST_KILL_EPOCHS", "1,3")
    store = Store(tmp_path / "ws")
    job_id = submit(store, tiny("train", epochs=4, model_spec="resnet20:widths=4,8,16"))
    for epoch in (1, 3):
        job = wait_for(store, job_id, lambda j: j["status"] in ("failed", "done"))
        assert job["status"] == "failed" and "killed by signal 9" in job["error"], job
        assert (tmp_path / f"killed.{epoch}").exists()
        resume(store, job_id)
    assert wait_for(store, job_id, lambda j: j["status"] in ("failed", "done"))["status"] == "done"
    assert sorted(m["epoch"] for m in store.metrics(job_id) if m["stage"] == "train") == [1, 2, 3, 4]


def test_a_full_disk_fails_the_job_naming_it_and_the_workspace_stays_readable(tmp_path, capsys):
    from sosp_engine.cli.main import main

    small = tmp_path / "small"
    small.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("filling a real disk needs root and a mountable tmpfs")
    try:
        store = Store(
            small / "ws"
        )  # 1 MB: the database and the log fit, a ResNet-20 checkpoint (2 MB) does not
        job_id = submit(store, tiny("train", epochs=2))
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                job = store.job(job_id)
            except StoreError as exc:  # read while the disk is full: said as such, not as a broken database
                assert "is full or failing" in str(exc) and "not damaged" in str(exc)
                continue
            if job["status"] in ("failed", "done"):
                break
            time.sleep(0.2)
        assert job["status"] == "failed" and "disk full (ENOSPC)" in job["error"], job
        assert main(["jobs", "list", "--workspace", str(small / "ws")]) == 0
        assert job_id in capsys.readouterr().out
        assert not list((small / "ws").rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


NARROW = "resnet20:widths=4,8,16"
NARROW_TRAIN = tiny("train", epochs=1, model_spec=NARROW)


def test_a_stopped_runner_is_not_resumed_beside_itself_and_records_each_epoch_once(tmp_path, monkeypatch):
    import sosp_engine.runs.jobs as jobs

    monkeypatch.setattr(jobs, "STALE_AFTER_SECONDS", 3.0)  # the watcher's side: the runner keeps its own beat
    monkeypatch.setattr(jobs, "EXIT_GRACE_SECONDS", 1.0)
    store = Store(tmp_path)
    job_id = submit(store, tiny("train", epochs=3, model_spec=NARROW))
    pid = wait_for(store, job_id, lambda j: j["status"] == "running" and j["pid"])["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(store, job_id, lambda j: bool(mark_stale_jobs(store)) or j["status"] == "failed", timeout=60)
        assert "no heartbeat" in store.job(job_id)["error"]
        with pytest.raises(StoreError, match="still has a live process"):
            resume(store, job_id)
    finally:
        os.kill(pid, signal.SIGCONT)
    job = wait_for(store, job_id, lambda j: j["status"] == "done")
    assert job["error"] is None and job["pid"] == pid  # the one runner finished it
    assert sorted(m["epoch"] for m in store.metrics(job_id) if m["stage"] == "train") == [1, 2, 3]


def test_aggressive_watchers_neither_fail_starting_jobs_nor_exceed_the_limit(tmp_path):
    import threading

    store = Store(tmp_path)
    ids = [submit(store, NARROW_TRAIN, name=f"j{i}", start=False) for i in range(4)]
    stop, most = threading.Event(), [0]

    def watch() -> None:
        while not stop.is_set():
            launch_pending(store)  # marks stale jobs first, as every page and CLI call does
            most[0] = max(most[0], len(store.jobs("running")) + len(store.jobs("starting")))
            time.sleep(0.01)

    watchers = [threading.Thread(target=watch) for _ in range(3)]
    for w in watchers:
        w.start()
    try:
        for job_id in ids:
            assert wait_for(store, job_id, lambda j: j["status"] in ("done", "failed"))["status"] == "done"
    finally:
        stop.set()
        for w in watchers:
            w.join()
    assert most[0] == 1 and all(store.job(i)["error"] is None for i in ids)


def test_custom_resources_read_name_amount_items_and_name_a_bad_one():
    from sosp_engine.runs.jobs import custom_resources

    assert custom_resources("nvme=1, fast_net=0.5") == {"nvme": 1.0, "fast_net": 0.5}
    assert custom_resources(["tpu=4"]) == {"tpu": 4.0}
    with pytest.raises(SospError, match="NAME=AMOUNT .*'nvme'"):
        custom_resources("nvme")


def test_the_files_a_cluster_job_names_are_found_for_the_storage_probe(tmp_path, user_model_spec):
    from sosp_engine.runs.jobs import local_paths

    data, weights = tmp_path / "images", tmp_path / "w.pt"
    data.mkdir()
    weights.write_bytes(b"x")
    config = {"model_spec": user_model_spec, "data_spec": f"imagefolder:{data}", "weights": str(weights)}
    found = local_paths(config)
    assert str(data) in found and str(weights) in found
    assert any(path.endswith("user_model.py") for path in found)
    assert local_paths({"model_spec": "resnet20", "data_spec": "digits"}) == []
