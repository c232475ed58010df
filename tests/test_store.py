import sqlite3
from pathlib import Path
import subprocess
import sys

import pytest

from conftest import ROOT
from sosp_engine.runs.store import SCHEMA_V1, SCHEMA_VERSION, Store, StoreError


def test_fresh_workspace_has_the_current_schema(tmp_path):
    store = Store(tmp_path / "ws")
    assert store.schema_version == SCHEMA_VERSION and (tmp_path / "ws" / "artifacts").is_dir()
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_records_survive_reopening_read_in_todays_shape(tmp_path):
    job = Store(tmp_path).add_job("train", "first", {"procedure": "train", "epochs": 3})
    config = Store(tmp_path).job(job)["config"]
    assert config["training"]["epochs"] == 3 and config["procedure"] == "train"


def test_an_older_workspace_is_migrated_keeping_its_records(tmp_path):
    db = tmp_path / "sosp.db"
    conn = sqlite3.connect(db)
    for statement in SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(
        "INSERT INTO jobs (id, kind, name, config, status, created, path) VALUES ('j1','train','old','{}','done',1,'x')"
    )
    conn.execute("PRAGMA application_id = 1397707600")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = Store(tmp_path)
    assert (
        store.schema_version == SCHEMA_VERSION
        and store.job("j1")["cancel_requested"] == 0
        and store.models() == []
    )
    assert store.job("j1")["backend"] == "local" and store.job("j1")["run_dir"] is None


def test_a_newer_workspace_is_refused_clearly(tmp_path):
    Store(tmp_path)
    with sqlite3.connect(tmp_path / "sosp.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer SOSP Lab"):
        Store(tmp_path)


def test_a_corrupted_database_is_a_clear_error_and_stays_untouched(tmp_path):
    (tmp_path / "sosp.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a readable SOSP Lab workspace"):
        Store(tmp_path)
    assert (tmp_path / "sosp.db").read_bytes().startswith(b"this is not")


def test_a_foreign_sqlite_database_is_refused(tmp_path):
    with sqlite3.connect(tmp_path / "sosp.db") as conn:
        conn.execute("CREATE TABLE songs (title TEXT)")
    with pytest.raises(StoreError, match="another program"):
        Store(tmp_path)


def test_a_failed_write_leaves_the_previous_state(tmp_path):
    store = Store(tmp_path)
    job = store.add_job("train", "t", {})
    with pytest.raises(RuntimeError):
        with store.transaction() as conn:
            conn.execute("UPDATE jobs SET status = 'done' WHERE id = ?", (job,))
            raise RuntimeError("crash mid-write")
    assert store.job(job)["status"] == "queued"


def test_delete_needs_confirmation_and_removes_artifacts(tmp_path):
    store = Store(tmp_path)
    job = store.add_job("train", "t", {})
    folder = store.job(job)["path"]
    with pytest.raises(StoreError, match="confirm"):
        store.delete("job", job)
    store.delete("job", job, confirm=True)
    assert store.jobs() == [] and not (tmp_path / folder).exists()


WRITER = """
import sys
sys.path.insert(0, {root!r})
from sosp_engine.runs.store import Store
store = Store({ws!r})
for i in range(300):
    store.update_job({job!r}, progress=i / 300, message=f"step {{i}}", config={{"label": f"{{i}} " + "x" * 2000}})
    store.add_metrics({job!r}, "train", i, {{"step": i}})
"""


def test_a_concurrent_reader_never_sees_a_torn_record(tmp_path):
    store = Store(tmp_path)
    job = store.add_job("train", "t", {"label": "-1 "})
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(root=str(ROOT), ws=str(tmp_path), job=job)]
    )
    reads = 0
    while writer.poll() is None or reads < 5:
        record = store.job(job)
        step = int(record["config"]["label"].split()[0])
        if step >= 0:
            assert record["message"] == f"step {step}" and record["progress"] == pytest.approx(step / 300)
        steps = [m["data"]["step"] for m in store.metrics(job)]
        assert steps == list(range(len(steps)))
        reads += 1
    assert writer.returncode == 0 and store.job(job)["config"]["label"].startswith("299 ")


def test_deleting_a_job_leaves_its_run_folder_under_the_shared_artifacts_folder_and_says_so(tmp_path):
    store = Store(tmp_path / "ws")
    job = store.add_job("train", "t", {}, "ray", "auto", tmp_path / "shared")
    run_dir = Path(store.job(job)["run_dir"])
    assert run_dir == (tmp_path / "shared" / job / "run").resolve()
    run_dir.mkdir(parents=True)
    (tmp_path / "shared" / "other").mkdir()
    kept = store.delete("job", job, confirm=True)
    assert run_dir.parent.exists() and str(run_dir.parent) in kept[0] and "not removed" in kept[0]
