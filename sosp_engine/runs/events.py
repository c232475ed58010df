"""A cluster job's events on the shared artifacts storage, where they outlive the Ray head, the submitting machine and
any dashboard: each writer (the job's task, each study unit's task, the job's host) appends JSON lines to a file of
its own under the run folder's `events/`, flushed to disk before the work goes on. The store ingests them by byte
offset per file, in one transaction with the offsets, so each event is applied once however often it is read.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

EVENTS_FOLDER = "events"


def events_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVENTS_FOLDER


class EventWriter:
    """Appends one writer's events (kind, payload) to `run_dir/events/<name>-<unique>.jsonl`, each synced to disk."""

    def __init__(self, run_dir: str | Path, name: str) -> None:
        folder = events_folder(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{name}-{uuid.uuid4().hex[:12]}.jsonl"

    def __call__(self, kind: str, payload: object) -> None:
        line = json.dumps({"time": time.time(), "kind": kind, "payload": payload}) + "\n"
        with open(self.path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def new_events(run_dir: str | Path, offsets: dict[str, int]) -> tuple[list[dict], dict[str, int]]:
    """The whole lines written after `offsets` ({file name: bytes read}) in every event file, and the offsets after
    them; a line still being written (no newline yet) waits for the next read."""
    folder = events_folder(run_dir)
    events: list[dict] = []
    after = dict(offsets)
    if not folder.is_dir():
        return events, after
    for path in sorted(folder.glob("*.jsonl")):
        start = offsets.get(path.name, 0)
        with open(path, "rb") as fh:
            fh.seek(start)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        for line in complete.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # a damaged line is skipped, never fatal: the rest of the file still counts
                continue
        after[path.name] = start + len(complete)
    events.sort(key=lambda e: (e.get("kind") == "end", e.get("time", 0.0)))
    return events, after
