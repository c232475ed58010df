"""The state of a study job as it stands (also while it runs): read from its run folder, wherever the job wrote it."""

from __future__ import annotations

import json

from ..atomic import MAX_JSON_FILE_BYTES, read_regular
from ..errors import AnalysisError, SospError
from .store import run_folder


def study_state(job: dict) -> dict:
    """A study job's state.json as it stands (also while it runs); {} before its first unit is recorded."""
    path = run_folder(job) / "state.json"
    try:
        return json.loads(read_regular(path, MAX_JSON_FILE_BYTES))
    except FileNotFoundError:
        if job.get("status") == "done":  # it was written somewhere: not where this machine looks
            raise AnalysisError(
                f"study {job['id']} is done but its state is not at {path} on this machine: a cluster run "
                "writes it under --artifacts, which must be storage every node and this machine reach at "
                "that path"
            ) from None
        return {}
    except (ValueError, OSError, RecursionError, SospError) as exc:
        raise AnalysisError(f"the state of study {job['id']} is unreadable: {exc}") from None


def study_cells(job: dict) -> list[dict]:
    """The finished cells of a study job so far."""
    state = study_state(job)
    if state and "cells" not in state:
        raise AnalysisError(f"the state of study {job['id']} is unreadable: it has no cells")
    return list(state.get("cells", {}).values())


def expand_state(job: dict) -> dict:
    """An expand study's plan and finished runs so far (read from its state, also while it runs)."""
    state = study_state(job)
    return {"plan": state.get("plan"), "runs": list(state.get("runs", {}).values())}
