"""Hostile input, second round: stored rows, links and files are data. They never run code, never steer a deletion,
never hang the queue and never give a silently wrong answer."""
import ast
import json
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import ROOT
from sosp_engine.cli import main
from sosp_engine.consent import has_consent, sign
from sosp_engine.errors import ModelSpecError
from sosp_engine.experiments import ExperimentConfig
from sosp_engine.jobs import is_stale, launch_pending, mark_stale_jobs, resume, run_job, submit
from sosp_engine.models import build_model
from sosp_engine.store import Store

MARKDOWN_SINKS = {"error", "warning", "info", "success", "caption", "markdown", "title", "header", "subheader",
                  "toast", "write", "expander"}


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
        conn.execute(f"UPDATE jobs SET {', '.join(f'{key} = ?' for key in fields)} WHERE id = ?",
                     (*fields.values(), job_id))


def queued_job(store: Store) -> str:
    return submit(store, ExperimentConfig(procedure="train", model_spec="resnet20", epochs=1), start=False)


# --- code runs only with consent ----------------------------------------------------------------------------------
def test_a_queued_job_whose_spec_was_edited_to_user_code_is_not_launched(tmp_path):
    store = Store(tmp_path / "ws")
    evil, marker = evil_file(tmp_path)
    job_id = queued_job(store)
    edit_job(store, job_id, config=json.dumps({**store.job(job_id)["config"], "model_spec": f"{evil}:f"}))
    assert launch_pending(store) == []
    job = store.job(job_id)
    assert job["status"] == "failed" and "--trust-code" in job["error"] and not marker.exists()


def test_the_job_runner_checks_consent_against_what_is_stored_when_it_starts(tmp_path):
    store = Store(tmp_path / "ws")
    evil, marker = evil_file(tmp_path)
    job_id = queued_job(store)
    edit_job(store, job_id, config=json.dumps({**store.job(job_id)["config"], "model_spec": f"{evil}:f"}))
    assert run_job(store, job_id) == 1
    assert store.job(job_id)["status"] == "failed" and not marker.exists()


def test_consent_is_recorded_with_a_submitted_user_code_job_and_bound_to_its_spec(tmp_path):
    from conftest import USER_MODEL

    store = Store(tmp_path / "ws")
    spec = USER_MODEL
    job_id = submit(store, ExperimentConfig(procedure="train", model_spec=spec, epochs=1), start=False)
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
    edit_job(store, job_id, status="failed", config=json.dumps({**store.job(job_id)["config"],
                                                                 "model_spec": f"{evil}:f"}))
    with pytest.raises(ModelSpecError, match="--trust-code"):
        resume(store, job_id, start=False)
    resume(store, job_id, start=False, trust_code=True)
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
    edit_job(store, stuck, status="starting", heartbeat=time.time() + 10 ** 6)
    assert stuck in mark_stale_jobs(store)
    assert store.job(stuck)["status"] == "failed" and store.job(waiting)["status"] == "queued"


def test_a_running_job_whose_heartbeat_lies_in_the_future_is_stale():
    import os

    job = {"status": "running", "backend": "local", "pid": os.getpid(), "heartbeat": time.time() + 3600,
           "created": time.time()}
    assert is_stale(job)


# --- user text is text -----------------------------------------------------------------------------------------------
def _shows_as_text(node: ast.AST) -> bool:
    """A string constant, a module constant, plain(...), len(...), a formatted number, or a mix of these."""
    if isinstance(node, ast.Constant) or (isinstance(node, ast.Name) and node.id.isupper()):
        return True
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("plain", "len"):
        return True
    if isinstance(node, ast.JoinedStr):
        return all(isinstance(v, ast.Constant) or v.format_spec is not None or _shows_as_text(v.value)
                   for v in node.values)
    if isinstance(node, ast.BinOp):
        return _shows_as_text(node.left) and _shows_as_text(node.right)
    if isinstance(node, ast.IfExp):
        return _shows_as_text(node.body) and _shows_as_text(node.orelse)
    return False


def test_every_markdown_sink_of_the_app_gets_user_text_through_plain():
    unsafe = []
    for path in sorted((ROOT / "app").glob("*.py")) + sorted((ROOT / "pages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in MARKDOWN_SINKS and not isinstance(node.func.value, ast.Constant)
                    and getattr(node.func.value, "id", "") != "fh" and node.args
                    and not _shows_as_text(node.args[0])):
                unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unsafe == []


def test_chart_titles_and_names_show_tags_as_text():
    import pandas as pd
    import plotly.express as px

    from app.text import text_only

    name = '<a href="http://evil">click</a>'
    fig = text_only(px.bar(pd.DataFrame({"run": [name], "acc": [1.0]}), x="run", y="acc", color="run", title=name))
    assert "<a" not in fig.layout.title.text and "<a" not in fig.data[0].name and "<a" not in fig.data[0].x[0]
    assert text_only(fig).layout.title.text == fig.layout.title.text  # escaping twice changes nothing
