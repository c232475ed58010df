"""The run store: a workspace folder with a SQLite database (WAL) and an artifacts folder, nothing ever half-written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..atomic import file_digest, write_bytes_atomically
from ..errors import SospError
from ..nets.setup import stored_setup
from .rows import MAX_TEXT_CHARS, bounded_columns, decoded, row_fault

SCHEMA_VERSION = 5
DB_NAME = "sosp.db"
WORKSPACE_ENV = "SOSP_WORKSPACE"
APPLICATION_ID = 0x534F5350  # "SOSP", marks the file as ours

SCHEMA_V1 = """
CREATE TABLE analyses (id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL, model_spec TEXT NOT NULL,
    data_spec TEXT NOT NULL, method TEXT NOT NULL, config TEXT NOT NULL, path TEXT NOT NULL, summary TEXT NOT NULL);
CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, config TEXT NOT NULL,
    status TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, pid INTEGER, heartbeat REAL,
    progress REAL NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '', error TEXT, result TEXT, path TEXT NOT NULL);
CREATE TABLE metrics (job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, time REAL NOT NULL,
    stage TEXT NOT NULL, epoch INTEGER NOT NULL, data TEXT NOT NULL);
CREATE INDEX metrics_job ON metrics(job_id, time);
"""
SCHEMA_V2 = """
CREATE TABLE models (id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL, model_spec TEXT NOT NULL,
    data_spec TEXT NOT NULL, weights TEXT NOT NULL, job_id TEXT, metrics TEXT NOT NULL);
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
"""
SCHEMA_V3 = """
ALTER TABLE jobs ADD COLUMN backend TEXT NOT NULL DEFAULT 'local';
ALTER TABLE jobs ADD COLUMN address TEXT;
ALTER TABLE jobs ADD COLUMN run_dir TEXT;
ALTER TABLE jobs ADD COLUMN node TEXT;
ALTER TABLE jobs ADD COLUMN remote_seq INTEGER NOT NULL DEFAULT 0;
"""
SCHEMA_V4 = """
ALTER TABLE jobs ADD COLUMN consent TEXT;
"""
SCHEMA_V5 = """
ALTER TABLE jobs ADD COLUMN event_offsets TEXT NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN resources TEXT NOT NULL DEFAULT '{}';
"""
MIGRATIONS = {0: SCHEMA_V1, 1: SCHEMA_V2, 2: SCHEMA_V3, 3: SCHEMA_V4, 4: SCHEMA_V5}
ARTIFACT_KINDS = {"analyses": "analyses", "jobs": "jobs"}  # table -> folder of artifacts/ holding ID/
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class StoreError(SospError):
    """The workspace cannot be opened or a record is missing."""


def default_workspace() -> Path:
    """`$SOSP_WORKSPACE` or ./workspace, as an absolute path (a job's runner starts in another folder)."""
    return Path(os.environ.get(WORKSPACE_ENV, "workspace")).expanduser().resolve()


def run_folder(job: dict) -> Path:
    """The folder a job's run writes its checkpoints, masks and state to (under --artifacts for cluster jobs)."""
    return Path(job["run_dir"]) if job.get("run_dir") else Path(job["path"]) / "run"


def _offsets(text: str | None) -> dict[str, int]:
    """The stored event-file offsets of a job ({} when unreadable: its events are read again; each epoch's metrics
    are still kept once)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def event_offsets(job: dict) -> dict[str, int]:
    """How far the store has read a remote job's event files."""
    return _offsets(job.get("event_offsets"))


def _rows(cursor: sqlite3.Cursor) -> list[dict]:
    """Records as dicts with their JSON fields decoded; a field that is oversized or not JSON marks its record
    `damaged`."""
    names = [c[0] for c in cursor.description]
    return [decoded(dict(zip(names, row))) for row in cursor.fetchall()]


def _inside(path: str | Path, folder: Path) -> bool:
    """Whether `path` resolves (symbolic links followed) to a place strictly inside `folder`."""
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return real != root and real.is_relative_to(root)


def _disk_trouble(exc: sqlite3.OperationalError) -> bool:
    """SQLite's words for a full or failing disk, as opposed to a damaged database."""
    text = str(exc).lower()
    return "disk i/o error" in text or "database or disk is full" in text


def _check_name(name: str) -> None:
    """A record's name is a line a person reads: bounded, so a listing never carries a novel."""
    if len(name) > MAX_TEXT_CHARS["name"]:
        raise StoreError(
            f"a name is at most {MAX_TEXT_CHARS['name']:,} characters, this one has {len(name):,}"
        )


class Store:
    """Records of analyses, jobs, their metrics and trained models, plus their artifact folders."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser().resolve() if root is not None else default_workspace()
        self.artifacts = self.root / "artifacts"
        self.db_path = self.root / DB_NAME
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(
                f"the workspace '{self.root}' is a file, not a folder: give a folder (--workspace or "
                "$SOSP_WORKSPACE)"
            )
        # a sound workspace on a read-only disk or folder opens for listing and viewing; writes say why they cannot
        self.read_only = self.db_path.is_file() and not (
            os.access(self.root, os.W_OK) and os.access(self.db_path, os.W_OK)
        )
        if not self.read_only:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self.artifacts.mkdir(exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the workspace '{self.root}': {exc.strerror or exc}"
                ) from None
        self._selects: dict[str, str] = {}
        self._migrate()

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:  # immutable: SQLite takes no locks and writes no -shm file beside it
            target = f"{self.db_path.resolve().as_uri()}?mode=ro&immutable=1"
            conn = sqlite3.connect(target, uri=True, timeout=30, isolation_level=None)
        else:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            yield conn
        except sqlite3.OperationalError as exc:
            if _disk_trouble(exc):
                raise StoreError(self._disk_message(exc)) from None
            raise
        except sqlite3.DatabaseError as exc:  # malformed pages: the file is damaged, not merely busy
            if (
                type(exc) is not sqlite3.DatabaseError
            ):  # integrity and programming errors are the caller's to handle
                raise
            raise StoreError(
                f"'{self.db_path}' is not a readable SOSP Lab workspace database ({exc}): restore it from "
                "a backup, or move it away or choose another workspace folder (the run folders under "
                "artifacts/ stay); nothing was changed"
            ) from None
        finally:
            conn.close()

    def _disk_message(self, exc: Exception) -> str:
        return (
            f"the disk holding the workspace '{self.root}' is full or failing ({exc}); free space there and retry "
            "(the database itself is not damaged)"
        )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: all of it lands, or none of it (readers see the previous state meanwhile)."""
        if self.read_only:
            raise StoreError(
                f"the workspace '{self.root}' is read-only (its folder or database cannot be written): it opens for "
                "listing and viewing only. Copy it to a writable folder, or make it writable, to change it"
            )
        with self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _migrate(self) -> None:
        existed = self.db_path.exists() and self.db_path.stat().st_size > 0
        try:
            with self.connection() as conn:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except StoreError:
            raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"'{self.db_path}' is not a readable SOSP Lab workspace database ({exc}). "
                "Move it away or choose another workspace folder; nothing was changed."
            ) from None
        if existed and (app_id != APPLICATION_ID or (tables and version == 0)):
            raise StoreError(
                f"'{self.db_path}' is a SQLite database of another program; choose another workspace folder"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the workspace '{self.root}' was written by a newer SOSP Lab (schema {version} > "
                f"{SCHEMA_VERSION}); upgrade SOSP Lab to open it"
            )
        if version == SCHEMA_VERSION:
            return
        if self.read_only:
            raise StoreError(
                f"the workspace '{self.root}' is read-only and of an older version (schema {version}), which "
                "must be upgraded in place: copy it to a writable folder and open the copy"
            )
        with self.transaction() as conn:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in range(current, SCHEMA_VERSION):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        with self.connection() as conn:
            conn.execute("PRAGMA journal_mode = WAL")

    def _columns(self, table: str) -> str:
        """The bounded SELECT list of a table (see rows.bounded_columns), read from the database once."""
        if table not in self._selects:
            with self.connection() as conn:
                names = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            self._selects[table] = bounded_columns(table, names)
        return self._selects[table]

    @property
    def schema_version(self) -> int:
        with self.connection() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    def new_artifact_dir(self, kind: str) -> tuple[str, Path]:
        """A fresh id and its artifact folder under artifacts/KIND/ID."""
        record_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        path = self.artifacts / kind / record_id
        path.mkdir(parents=True)
        return record_id, path

    # analyses -----------------------------------------------------------------------------------------------
    def add_analysis(self, record_id: str, name: str, config: dict, path: Path, summary: dict) -> None:
        _check_name(name)
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO analyses VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    record_id,
                    name,
                    time.time(),
                    stored_setup(config).model_spec,
                    stored_setup(config).data_spec,
                    config["method"],
                    json.dumps(config),
                    str(path),
                    json.dumps(summary),
                ),
            )

    def analyses(self, damaged: list[str] | None = None) -> list[dict]:
        """Every readable analysis record, newest first; unreadable ones are named in `damaged` instead."""
        with self.connection() as conn:
            return self._sound(
                "analyses",
                _rows(
                    conn.execute(f"SELECT {self._columns('analyses')} FROM analyses ORDER BY created DESC")
                ),
                damaged,
            )

    def _sound(self, table: str, records: list[dict], damaged: list[str] | None) -> list[dict]:
        """The records whose fields are readable and whose folders lie in this workspace; the others are described
        in `damaged` ("ID: why"), never acted on: a stored row is data, and an edited one must not steer a path."""
        sound = []
        for record in records:
            why = record.get("damaged") or row_fault(table, record) or self._path_trouble(table, record)
            if why:
                if damaged is not None:
                    damaged.append(f"{record.get('id')}: {why}")
            else:
                sound.append(record)
        return sound

    def _path_trouble(self, table: str, record: dict) -> str | None:
        """Why a record's folders cannot be used, or None; its own folder is derived from its id (the stored path
        is never followed, so a moved workspace keeps working and an edited path steers nothing)."""
        if table in ARTIFACT_KINDS:
            if not _PLAIN_ID.fullmatch(str(record.get("id"))):
                return "its id is not a plain name (letters, digits, '-', '_')"
            record["path"] = str(self.artifacts / ARTIFACT_KINDS[table] / record["id"])
        run_dir = record.get("run_dir") if table == "jobs" else None
        if run_dir and not (
            Path(run_dir).is_absolute()
            and Path(run_dir).name == "run"
            and Path(run_dir).parent.name == record.get("id")
            and ".." not in Path(run_dir).parts
        ):
            return f"its run folder '{run_dir}' is not ARTIFACTS/{record.get('id')}/run"
        return None

    def _one(self, table: str, what: str, record_id: str) -> dict:
        with self.connection() as conn:
            rows = _rows(
                conn.execute(f"SELECT {self._columns(table)} FROM {table} WHERE id = ?", (record_id,))
            )
        if not rows:
            raise StoreError(f"no {what} with id '{record_id}' in {self.root}")
        damaged: list[str] = []
        if not self._sound(table, rows, damaged):
            raise StoreError(
                f"the {what} record {damaged[0]}; it is not used. Delete the record ({what} delete "
                f"{record_id} --yes removes only files inside the workspace) or repair the database."
            )
        return rows[0]

    def analysis(self, record_id: str) -> dict:
        return self._one("analyses", "analysis", record_id)

    def rename_analysis(self, record_id: str, name: str) -> None:
        _check_name(name)
        with self.transaction() as conn:
            conn.execute("UPDATE analyses SET name = ? WHERE id = ?", (name, record_id))

    def analyses_on_weights_of(self, job_id: str) -> list[dict]:
        """The listed analyses computed on weights a job wrote (in its folders): they outlive the job's deletion as
        results, but their weights go with it."""
        folder = self.artifacts / "jobs" / job_id
        return [
            record
            for record in self.analyses()
            if (weights := stored_setup(record["config"]).weights) and _inside(weights, folder)
        ]

    # uploads ------------------------------------------------------------------------------------------------
    def save_upload(self, name: str, data: bytes) -> Path:
        """An uploaded file stored by its content (uploads/SHA256/NAME): a second upload of the same name never
        replaces the bytes an earlier analysis used, and the same bytes are stored once."""
        digest = hashlib.sha256(data).hexdigest()[:32]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name).strip("-.")[:100] or "upload"
        target = self.root / "uploads" / digest / safe
        if not (target.is_file() and file_digest(target)[:32] == digest):
            write_bytes_atomically(target, data)
        return target

    # models -------------------------------------------------------------------------------------------------
    def add_model(
        self, name: str, model_spec: str, data_spec: str, weights: Path, job_id: str | None, metrics: dict
    ) -> str:
        record_id = f"m-{uuid.uuid4().hex[:10]}"
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO models VALUES (?,?,?,?,?,?,?,?)",
                (
                    record_id,
                    name,
                    time.time(),
                    model_spec,
                    data_spec,
                    str(weights),
                    job_id,
                    json.dumps(metrics),
                ),
            )
        return record_id

    def models(self, damaged: list[str] | None = None) -> list[dict]:
        """Every readable trained-model record, newest first; unreadable ones are named in `damaged` instead."""
        with self.connection() as conn:
            rows = _rows(conn.execute(f"SELECT {self._columns('models')} FROM models ORDER BY created DESC"))
        return self._sound("models", rows, damaged)

    # jobs ---------------------------------------------------------------------------------------------------
    def add_job(
        self,
        kind: str,
        name: str,
        config: dict,
        backend: str = "local",
        address: str | None = None,
        artifacts: str | Path | None = None,
        consent: str | None = None,
        resources: dict | None = None,
    ) -> str:
        """Queue a job; its log stays here, its run folder is under `artifacts` (a folder every node reaches) if given;
        `consent` is the user's signed confirmation of the user code its model spec runs (see consent.py);
        `resources` what a cluster job asks of each worker (GPUs per worker, accelerator type, custom resources)."""
        _check_name(name)
        record_id, path = self.new_artifact_dir("jobs")
        run_dir = str(Path(artifacts).expanduser().resolve() / record_id / "run") if artifacts else None
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (id, kind, name, config, status, created, path, backend, address, run_dir, "
                "consent, resources) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record_id,
                    kind,
                    name,
                    json.dumps(config),
                    "queued",
                    time.time(),
                    str(path),
                    backend,
                    address,
                    run_dir,
                    consent,
                    json.dumps(resources or {}),
                ),
            )
        return record_id

    def job(self, record_id: str) -> dict:
        return self._one("jobs", "job", record_id)

    def jobs(self, status: str | None = None, damaged: list[str] | None = None) -> list[dict]:
        """Readable job records (of one status, oldest first; else all, newest first); unreadable ones go to
        `damaged` as "ID: why"."""
        with self.connection() as conn:
            if status:
                rows = _rows(
                    conn.execute(
                        f"SELECT {self._columns('jobs')} FROM jobs WHERE status = ? ORDER BY created",
                        (status,),
                    )
                )
            else:
                rows = _rows(conn.execute(f"SELECT {self._columns('jobs')} FROM jobs ORDER BY created DESC"))
        return self._sound("jobs", rows, damaged)

    def update_job(self, record_id: str, **fields: Any) -> None:
        if not fields:
            return
        for key in ("config", "result"):
            if key in fields and not isinstance(fields[key], str) and fields[key] is not None:
                fields[key] = json.dumps(fields[key])
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as conn:
            conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), record_id))

    def claim_queued_jobs(self, limit: int, backend: str = "local") -> list[dict]:
        """Atomically move up to `limit - running` oldest queued jobs of a backend to 'starting' (FIFO), so two
        launchers never start one twice."""
        with self.transaction() as conn:
            running = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN ('starting', 'running') AND backend = ?",
                (backend,),
            ).fetchone()[0]
            free = max(0, limit - running)
            queued = conn.execute(
                f"SELECT {self._columns('jobs')} FROM jobs WHERE status = 'queued' AND backend = ? ORDER BY created",
                (backend,),
            )
            rows = self._sound("jobs", _rows(queued), None)[:free]  # a damaged row never holds up the queue
            now = time.time()
            for row in (
                rows
            ):  # the claim is a heartbeat: a watcher must not take a job being launched for a dead one
                conn.execute(
                    "UPDATE jobs SET status = 'starting', heartbeat = ?, pid = NULL WHERE id = ?",
                    (now, row["id"]),
                )
                row.update(status="starting", heartbeat=now, pid=None)
        return rows

    def add_metrics(self, job_id: str, stage: str, epoch: int, data: dict) -> None:
        """Record one epoch's metrics; a redone epoch (after a kill) replaces its earlier record, so each is
        kept once."""
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM metrics WHERE job_id = ? AND stage = ? AND epoch = ?", (job_id, stage, epoch)
            )
            conn.execute(
                "INSERT INTO metrics VALUES (?,?,?,?,?)",
                (job_id, time.time(), stage, epoch, json.dumps(data)),
            )

    def apply_remote_events(
        self,
        job_id: str,
        read_from: dict[str, int],
        read_to: dict[str, int],
        metrics: list[tuple[str, int, dict]],
        fields: dict,
    ) -> bool:
        """A remote job's events read from its event files between the offsets `read_from` and `read_to`, in one
        transaction with the new offsets: applied once, whoever reads them and however often (False: another reader
        applied them first)."""
        for key in ("result",):
            if key in fields and fields[key] is not None and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key])
        with self.transaction() as conn:
            row = conn.execute("SELECT event_offsets FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or _offsets(row[0]) != read_from:
                return False
            for stage, epoch, data in metrics:
                conn.execute(
                    "DELETE FROM metrics WHERE job_id = ? AND stage = ? AND epoch = ?", (job_id, stage, epoch)
                )
                conn.execute(
                    "INSERT INTO metrics VALUES (?,?,?,?,?)",
                    (job_id, time.time(), stage, epoch, json.dumps(data)),
                )
            fields = {**fields, "event_offsets": json.dumps(read_to, sort_keys=True)}
            conn.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                (*fields.values(), job_id),
            )
        return True

    def metrics(self, job_id: str) -> list[dict]:
        with self.connection() as conn:
            rows = _rows(
                conn.execute(
                    f"SELECT {self._columns('metrics')} FROM metrics WHERE job_id = ? ORDER BY time",
                    (job_id,),
                )
            )
        return [m for m in rows if not m.get("damaged") and isinstance(m["data"], dict)]

    # deletion ---------------------------------------------------------------------------------------------------
    def delete(self, kind: str, record_id: str, confirm: bool = False) -> list[str]:
        """Delete an analysis or job record and its artifacts; refuses unless `confirm` is True. Only folders that
        resolve inside this workspace's artifacts folder are removed: the others (a cluster job's run folder under
        --artifacts, a path edited in the database) are left and returned, each with why, for the caller to report."""
        if not confirm:
            raise StoreError(
                f"deleting {kind} '{record_id}' removes its artifacts for good: pass confirm=True (CLI: --yes)"
            )
        table = {"analysis": "analyses", "job": "jobs"}[kind]
        with self.connection() as conn:
            rows = _rows(
                conn.execute(f"SELECT {self._columns(table)} FROM {table} WHERE id = ?", (record_id,))
            )
        if not rows:
            raise StoreError(f"no {kind} with id '{record_id}' in {self.root}")
        record = rows[0]
        if kind == "job" and record["status"] in ("running", "starting"):
            raise StoreError(f"job '{record_id}' is still running: cancel it first")
        with self.transaction() as conn:
            conn.execute(f"DELETE FROM {table} WHERE id = ?", (record_id,))
            if kind == "job":  # the model it trained goes with it: its weights file is in the job's folder
                conn.execute("DELETE FROM models WHERE job_id = ?", (record_id,))
        kept = []
        folders = (
            [self.artifacts / ARTIFACT_KINDS[table] / record_id] if _PLAIN_ID.fullmatch(record_id) else []
        )
        folders += [Path(record["run_dir"]).parent] if record.get("run_dir") else []
        for folder in folders:
            if not os.path.lexists(folder):
                continue
            if _inside(folder, self.artifacts) and folder.is_dir():
                shutil.rmtree(folder)
            else:
                kept.append(
                    f"{folder} (outside the workspace's artifacts folder {self.artifacts}: not removed; "
                    "remove it yourself if it is this record's)"
                )
        return kept
