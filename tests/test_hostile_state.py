"""Hostile input, second round: stored rows, links and files are data. They never run code, never steer a deletion,
never hang the queue and never give a silently wrong answer."""

import ast
import json
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_browser import server  # noqa: F401 (the dashboard on a free port)
from sosp_engine.cli.main import main
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.runs.consent import has_consent, sign
from sosp_engine.errors import ModelSpecError
from sosp_engine.experiments.procedures import ExperimentConfig
from sosp_engine.runs.jobs import is_stale, launch_pending, mark_stale_jobs, resume, run_job, submit
from sosp_engine.nets import build_model
from sosp_engine.runs.store import Store

MARKDOWN_SINKS = {
    "error",
    "warning",
    "info",
    "success",
    "caption",
    "markdown",
    "title",
    "header",
    "subheader",
    "toast",
    "write",
    "expander",
}


@pytest.fixture(autouse=True)
def consent_key(tmp_path, monkeypatch):
    """Each test has its own consent key (the user's, outside every workspace)."""
    monkeypatch.setenv("SOSP_CONSENT_KEY", str(tmp_path / "consent.key"))


def evil_file(tmp_path: Path) -> tuple[Path, Path]:
    """A model file that leaves a marker when it is imported; returns (file, marker)."""
    marker = tmp_path / "evil-ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef f():\n    pass\n")
    return evil, marker


def edit_job(store: Store, job_id: str, **fields) -> None:
    """What an attacker with the database does: rewrite a row behind the engine's back."""
    with sqlite3.connect(store.db_path) as conn:
        conn.execute(
            f"UPDATE jobs SET {', '.join(f'{key} = ?' for key in fields)} WHERE id = ?",
            (*fields.values(), job_id),
        )


def queued_job(store: Store) -> str:
    return submit(
        store,
        config_from_dict(ExperimentConfig, dict(procedure="train", model_spec="resnet20", epochs=1)),
        start=False,
    )


def with_spec(config: dict, spec: str) -> dict:
    """A stored job config with its model spec edited (as a hand or a tool could, in the database)."""
    return {**config, "setup": {**config["setup"], "model_spec": spec}}


# --- code runs only with consent ----------------------------------------------------------------------------------
def test_a_queued_job_whose_spec_was_edited_to_user_code_is_not_launched(tmp_path):
    store = Store(tmp_path / "ws")
    evil, marker = evil_file(tmp_path)
    job_id = queued_job(store)
    edit_job(store, job_id, config=json.dumps(with_spec(store.job(job_id)["config"], f"{evil}:f")))
    assert launch_pending(store) == []
    job = store.job(job_id)
    assert job["status"] == "failed" and "--run-code" in job["error"] and not marker.exists()


def test_the_job_runner_checks_consent_against_what_is_stored_when_it_starts(tmp_path):
    store = Store(tmp_path / "ws")
    evil, marker = evil_file(tmp_path)
    job_id = queued_job(store)
    edit_job(store, job_id, config=json.dumps(with_spec(store.job(job_id)["config"], f"{evil}:f")))
    assert run_job(store, job_id) == 1
    assert store.job(job_id)["status"] == "failed" and not marker.exists()


def test_consent_is_recorded_with_a_submitted_user_code_job_and_bound_to_its_spec(tmp_path):
    from conftest import USER_MODEL

    store = Store(tmp_path / "ws")
    spec = USER_MODEL
    job_id = submit(
        store,
        config_from_dict(ExperimentConfig, dict(procedure="train", model_spec=spec, epochs=1)),
        start=False,
    )
    job = store.job(job_id)
    assert has_consent(spec, job["consent"])
    assert not has_consent(spec + "x", job["consent"]) and not has_consent(spec, "0" * 64)


def test_a_consent_copied_from_another_key_is_not_consent(tmp_path, monkeypatch):
    token = sign("evil.py:f")
    monkeypatch.setenv("SOSP_CONSENT_KEY", str(tmp_path / "other.key"))
    assert not has_consent("evil.py:f", token)


def test_resume_of_an_unconfirmed_user_code_job_needs_trust_code(tmp_path, capsys):
    store = Store(tmp_path / "ws")
    evil, marker = evil_file(tmp_path)
    job_id = queued_job(store)
    edit_job(
        store,
        job_id,
        status="failed",
        config=json.dumps(with_spec(store.job(job_id)["config"], f"{evil}:f")),
    )
    with pytest.raises(ModelSpecError, match="--run-code"):
        resume(store, job_id, start=False)
    resume(store, job_id, start=False, run_code=True)
    assert has_consent(f"{evil}:f", store.job(job_id)["consent"]) and not marker.exists()


def test_a_package_module_is_refused_before_it_is_imported(capsys):
    with pytest.raises(ModelSpecError, match="nothing was imported"):
        build_model("this:x")
    assert "Zen of Python" not in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["antigravity:x", "json.tool:main", "torch.nn:Linear", "http.server:test"])
def test_installed_and_standard_modules_are_never_imported_as_model_code(spec):
    with pytest.raises(ModelSpecError, match="not a model factory of your own code"):
        build_model(spec)


def test_a_module_of_the_users_own_code_still_builds():
    assert build_model("tests.fixtures.user_model:build") is not None


# --- stored paths are data ----------------------------------------------------------------------------------------
def test_jobs_delete_never_removes_a_folder_outside_the_workspace(tmp_path, capsys):
    store = Store(tmp_path / "ws")
    victim = tmp_path / "home" / "projects"
    (victim / "run").mkdir(parents=True)
    (victim / "thesis.tex").write_text("years of work")
    job_id = queued_job(store)
    edit_job(store, job_id, status="done", id="projects", run_dir=str(victim / "run"), backend="ray")
    assert main(["jobs", "delete", "projects", "--yes", "--workspace", str(store.root)]) == 0
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert "not removed" in capsys.readouterr().err


def test_a_stored_job_path_is_never_followed(tmp_path):
    store = Store(tmp_path / "ws")
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    job_id = queued_job(store)
    edit_job(store, job_id, status="done", path=str(victim))
    assert store.job(job_id)["path"] == str(store.artifacts / "jobs" / job_id)
    store.delete("job", job_id, confirm=True)
    assert victim.is_dir()


def test_a_job_id_that_is_not_a_plain_name_is_listed_as_damaged_and_removes_nothing(tmp_path):
    store = Store(tmp_path / "ws")
    (tmp_path / "ws" / "keep").mkdir()
    job_id = queued_job(store)
    edit_job(store, job_id, status="done", id="../../keep")
    damaged: list[str] = []
    assert store.jobs(damaged=damaged) == [] and "not a plain name" in damaged[0]
    store.delete("job", "../../keep", confirm=True)
    assert (tmp_path / "ws" / "keep").is_dir()


def test_a_symbolic_link_inside_the_artifacts_folder_does_not_lead_a_deletion_out(tmp_path):
    store = Store(tmp_path / "ws")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    job_id = queued_job(store)
    own = store.artifacts / "jobs" / job_id
    for item in own.iterdir():
        item.unlink()
    own.rmdir()
    own.symlink_to(victim)
    edit_job(store, job_id, status="done")
    kept = store.delete("job", job_id, confirm=True)
    assert (victim / "keep.txt").exists() and kept


def test_a_moved_workspace_keeps_its_records_usable(tmp_path):
    import shutil

    store = Store(tmp_path / "ws")
    job_id = queued_job(store)
    shutil.move(tmp_path / "ws", tmp_path / "moved")
    moved = Store(tmp_path / "moved")
    assert moved.job(job_id)["path"] == str(moved.artifacts / "jobs" / job_id)


def test_one_job_row_whose_config_is_not_json_does_not_hide_the_others(tmp_path, capsys):
    store = Store(tmp_path / "ws")
    good, bad = queued_job(store), queued_job(store)
    edit_job(store, bad, config="{not json")
    assert main(["jobs", "list", "--workspace", str(store.root)]) == 0
    out = capsys.readouterr()
    assert good in out.out and bad in out.err and "not JSON" in out.err


# --- the queue never hangs ------------------------------------------------------------------------------------------
def test_a_starting_job_with_a_heartbeat_in_the_future_does_not_block_the_queue(tmp_path):
    store = Store(tmp_path / "ws")
    stuck, waiting = queued_job(store), queued_job(store)
    edit_job(store, stuck, status="starting", heartbeat=time.time() + 10**6)
    assert stuck in mark_stale_jobs(store)
    assert store.job(stuck)["status"] == "failed" and store.job(waiting)["status"] == "queued"


def test_a_running_job_whose_heartbeat_lies_in_the_future_is_stale():
    import os

    job = {
        "status": "running",
        "backend": "local",
        "pid": os.getpid(),
        "heartbeat": time.time() + 3600,
        "created": time.time(),
    }
    assert is_stale(job)


# --- user text is text -----------------------------------------------------------------------------------------------
def _shows_as_text(node: ast.AST) -> bool:
    """A string constant, a module constant, plain(...), len(...), a formatted number, or a mix of these."""
    if isinstance(node, ast.Constant) or (isinstance(node, ast.Name) and node.id.isupper()):
        return True
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("plain", "len"):
        return True
    if isinstance(node, ast.JoinedStr):
        return all(
            isinstance(v, ast.Constant) or v.format_spec is not None or _shows_as_text(v.value)
            for v in node.values
        )
    if isinstance(node, ast.BinOp):
        return _shows_as_text(node.left) and _shows_as_text(node.right)
    if isinstance(node, ast.IfExp):
        return _shows_as_text(node.body) and _shows_as_text(node.orelse)
    return False


def test_every_markdown_sink_of_the_app_gets_user_text_through_plain():
    unsafe = []
    for path in sorted((ROOT / "app").glob("*.py")) + sorted((ROOT / "pages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in MARKDOWN_SINKS
                and not isinstance(node.func.value, ast.Constant)
                and getattr(node.func.value, "id", "") != "fh"
                and node.args
                and not _shows_as_text(node.args[0])
            ):
                unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unsafe == []


def test_chart_titles_and_names_show_tags_as_text():
    import pandas as pd
    import plotly.express as px

    from app.text import text_only

    name = '<a href="http://evil">click</a>'
    fig = text_only(
        px.bar(pd.DataFrame({"run": [name], "acc": [1.0]}), x="run", y="acc", color="run", title=name)
    )
    assert "<a" not in fig.layout.title.text and "<a" not in fig.data[0].name and "<a" not in fig.data[0].x[0]
    assert text_only(fig).layout.title.text == fig.layout.title.text  # escaping twice changes nothing


# --- counts are bounded by the machine and the data ------------------------------------------------------------------
def test_more_analysis_samples_than_the_data_holds_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "analyze",
            "--model",
            "resnet20",
            "--data",
            "synthetic:3,8,8:3",
            "--method",
            "magnitude",
            "--samples",
            "1000000000",
            "--out",
            str(tmp_path / "a"),
        ]
    )
    assert code == 2 and "holds 256" in capsys.readouterr().err


def test_more_sensitivity_points_than_distinct_masks_is_a_clear_error():
    from sosp_engine.errors import AnalysisError
    from sosp_engine.experiments.sensitivity import even_grid

    with pytest.raises(AnalysisError, match="only 17 different masks"):
        even_grid(100_000_000, 0.9, distinct=17)


def test_more_training_processes_than_cpu_cores_is_a_clear_error():
    import os

    from sosp_engine.experiments.distributed import training_devices
    from sosp_engine.errors import SospError
    from sosp_engine.experiments.training import TrainConfig

    with pytest.raises(SospError, match="cores"):
        training_devices(TrainConfig(nproc=len(os.sched_getaffinity(0)) + 1, device="cpu"))


# --- files are checked before they are read --------------------------------------------------------------------------
def test_a_zip_bomb_checkpoint_is_refused_before_it_is_unpacked(tmp_path):
    import zipfile

    from sosp_engine.errors import CheckpointError
    from sosp_engine.nets import read_checkpoint

    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", b"\0" * (64 << 20))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match="declares"):
        read_checkpoint(bomb)


def test_a_checkpoint_larger_unpacked_than_the_memory_budget_is_refused(tmp_path):
    import torch

    from sosp_engine.atomic import load_verified
    from sosp_engine.errors import CheckpointError

    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    with pytest.raises(CheckpointError, match="more than the 100 bytes"):
        load_verified(path, budget=100)


def test_an_oversized_mask_file_is_refused_unread(tmp_path, monkeypatch):
    import sosp_engine.pruning.masks as masks
    from sosp_engine.errors import MaskError

    monkeypatch.setattr(masks, "MASK_FILE_LIMIT", 1000)
    path = tmp_path / "mask.json"
    path.write_text(json.dumps({"format": masks.MASK_FORMAT, "pruned": ["x:1"] * 1000}))
    with pytest.raises(MaskError, match="was not read"):
        masks.load_mask(path)


def test_a_checkpoint_with_flipped_bytes_fails_its_checksum(tmp_path):
    import torch

    from sosp_engine.atomic import save_atomically
    from sosp_engine.errors import CheckpointError
    from sosp_engine.nets import read_checkpoint

    path = save_atomically({"w": torch.randn(4096)}, tmp_path / "w.pt")
    raw = bytearray(path.read_bytes())
    raw[-6000:-2000] = bytes(4000)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(path)


def test_a_resume_checkpoint_that_is_damaged_falls_back_to_the_one_before(tmp_path, capsys):
    from sosp_engine.atomic import load_with_fallback, save_atomically

    path = tmp_path / "last.pt"
    save_atomically({"epoch": 1}, path, keep_previous=True)
    save_atomically({"epoch": 2}, path, keep_previous=True)
    path.write_bytes(b"garbage")
    assert load_with_fallback(path)["epoch"] == 1
    assert "last.pt" in capsys.readouterr().err


def test_a_resume_with_no_good_checkpoint_names_the_file_and_what_to_do(tmp_path):
    from sosp_engine.atomic import load_with_fallback
    from sosp_engine.errors import CheckpointError

    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"last\.pt.*delete"):
        load_with_fallback(path)


def test_a_file_size_limit_while_saving_is_named(tmp_path):
    import resource
    import subprocess
    import sys

    script = (
        f"import resource, torch\nresource.setrlimit(resource.RLIMIT_FSIZE, (200000, {resource.RLIM_INFINITY}))\n"
        "from sosp_engine.atomic import save_atomically\n"
        f"save_atomically({{'w': torch.zeros(200000)}}, {str(tmp_path / 'big.pt')!r})\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "ulimit -f" in run.stderr and not (tmp_path / "big.pt").exists()


# --- checkpoints the model cannot use are named ----------------------------------------------------------------------
def _demo_state():
    return build_model("resnet20").state_dict()


def test_a_checkpoint_with_negative_batchnorm_variance_is_refused(tmp_path):
    import torch

    from sosp_engine.errors import CheckpointError
    from sosp_engine.nets import load_weights

    state = _demo_state()
    state["bn1.running_var"][0] = -1.0
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="negative BatchNorm variances in bn1.running_var"):
        load_weights(build_model("resnet20"), tmp_path / "w.pt")


def test_a_complex_checkpoint_is_called_complex(tmp_path):
    import torch

    from sosp_engine.errors import CheckpointError
    from sosp_engine.nets import load_weights

    state = {k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in _demo_state().items()}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="complex tensors"):
        load_weights(build_model("resnet20"), tmp_path / "w.pt")


def test_a_folder_given_as_weights_is_called_a_folder(tmp_path):
    from sosp_engine.errors import CheckpointError
    from sosp_engine.nets import read_checkpoint

    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)


# --- data that would give a silently wrong answer ---------------------------------------------------------------------
def test_a_one_class_image_folder_is_refused(tmp_path):
    from PIL import Image

    from sosp_engine.nets.data import load_data
    from sosp_engine.errors import DataSpecError

    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "cat" / "a.png")
    with pytest.raises(DataSpecError, match="at least 2 classes"):
        load_data(f"imagefolder:{tmp_path}")


def _cifar_folder(tmp_path: Path, labels, images: int = 10) -> Path:
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((images, 3072), dtype=np.uint8) if images else [], "labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return tmp_path


def test_fractional_cifar_labels_are_refused_not_truncated(tmp_path):
    from sosp_engine.nets.data import load_data
    from sosp_engine.errors import DataSpecError

    with pytest.raises(DataSpecError, match="not whole class numbers"):
        load_data(f"cifar10:{_cifar_folder(tmp_path, [0.5] * 10)}")


def test_an_empty_cifar_batch_says_it_holds_no_images(tmp_path):
    from sosp_engine.nets.data import load_data
    from sosp_engine.errors import DataSpecError

    with pytest.raises(DataSpecError, match="hold no images"):
        load_data(f"cifar10:{_cifar_folder(tmp_path, [], images=0)}")


def test_saliencies_that_are_all_zero_write_no_mask(tmp_path):
    import torch

    from sosp_engine.saliency.analysis import _require_ranking, AnalysisConfig
    from sosp_engine.errors import AnalysisError

    with pytest.raises(AnalysisError, match="1 class"):
        _require_ranking(
            torch.zeros(5),
            AnalysisConfig(method="sosp-h"),
            torch.zeros(4, dtype=torch.long),
            torch.nn.Linear(2, 2),
        )


# --- paths and pipes ---------------------------------------------------------------------------------------------------
def test_a_relative_workspace_is_resolved_once_to_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Store("ws").root == tmp_path / "ws"


def test_a_closed_pipe_ends_the_cli_quietly(tmp_path):
    import subprocess
    import sys

    store = Store(tmp_path / "ws")
    job_id = queued_job(store)
    run = subprocess.run(
        f"{sys.executable} -m sosp_engine jobs show {job_id} --workspace {store.root} | head -1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout.strip() == "{" and "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr


# --- the dashboard answers only its own host -------------------------------------------------------------------------
def _websocket_status(url: str, host: str, origin: str) -> str:
    """The status line the app's WebSocket endpoint answers to an upgrade request with these Host and Origin."""
    port = int(url.rsplit(":", 1)[1])
    request = (
        f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: streamlit\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request.encode())
        return conn.recv(4096).decode(errors="replace").split("\r\n")[0]


def test_the_websocket_refuses_a_foreign_host_or_origin(server):  # noqa: F811 (the fixture imported above)
    url, _ = server
    local = url.split("//")[1]
    assert " 101 " in _websocket_status(url, local, f"http://{local}")
    assert " 101 " not in _websocket_status(url, "evil.example", "http://evil.example")  # DNS rebinding
    assert " 101 " not in _websocket_status(url, local, "http://evil.example")  # another site's page


def test_an_image_declaring_more_pixels_than_any_photo_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    import sosp_engine.nets.data as data
    from sosp_engine.errors import DataSpecError

    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    with pytest.raises(DataSpecError, match="declares 20x20 pixels"):
        data._image(str(tmp_path / "big.png"))
