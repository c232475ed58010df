"""What a stored row must be, checked alone when it is read: each column's type and size, and its config against the
schema of its kind. A row that fails is one damaged row (its id and the field at fault); every other row stays usable.

The workspace is shared, copied and hand-edited, so a row is data from anywhere: nothing in it may stop the reading of
the others (deep nesting, a wrong type, a config of 500 MB) or reach code that trusts its shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from ..errors import SospError
from ..experiments.expand_study import EXPAND_STUDY_KIND, ExpandStudyConfig
from ..experiments.procedures import PROCEDURES, ExperimentConfig
from ..experiments.studies import STUDY_KIND, StudyConfig
from ..nets.setup import config_from_dict
from ..saliency.analysis import AnalysisConfig

JSON_COLUMNS = ("config", "summary", "result", "metrics", "data", "resources")
MAX_JSON_CHARS = 4_000_000  # a config is a few kB, a study's result some hundred kB
MAX_DEPTH = 32  # stored configs and results nest 3-4 levels
MAX_TEXT_CHARS = {"name": 1_000, "message": 10_000, "error": 200_000}
RESULT_NUMBERS = ("test_acc", "test_loss", "params", "macs")  # what the listings show of a job's result
JOB_STATES = ("queued", "starting", "running", "done", "failed", "cancelled")

NUMBER, TEXT, WHOLE = (int, float), (str,), (int,)
COLUMN_TYPES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {  # column -> (types, may be NULL)
    "analyses": {
        "id": (TEXT, False),
        "name": (TEXT, False),
        "created": (NUMBER, False),
        "model_spec": (TEXT, False),
        "data_spec": (TEXT, False),
        "method": (TEXT, False),
        "config": ((dict,), False),
        "summary": ((dict,), False),
    },
    "jobs": {
        "id": (TEXT, False),
        "kind": (TEXT, False),
        "name": (TEXT, False),
        "config": ((dict,), False),
        "status": (TEXT, False),
        "created": (NUMBER, False),
        "started": (NUMBER, True),
        "finished": (NUMBER, True),
        "pid": (WHOLE, True),
        "heartbeat": (NUMBER, True),
        "progress": (NUMBER, False),
        "message": (TEXT, False),
        "error": (TEXT, True),
        "result": ((dict,), True),
        "cancel_requested": (WHOLE, False),
        "backend": (TEXT, False),
        "address": (TEXT, True),
        "node": (TEXT, True),
        "remote_seq": (WHOLE, False),
        "consent": (TEXT, True),
        "resources": ((dict,), False),
    },
    "models": {
        "id": (TEXT, False),
        "name": (TEXT, False),
        "created": (NUMBER, False),
        "model_spec": (TEXT, False),
        "data_spec": (TEXT, False),
        "weights": (TEXT, False),
        "job_id": (TEXT, True),
        "metrics": ((dict,), False),
    },
}


def bounded_columns(table: str, names: list[str]) -> str:
    """The SELECT list of `table`: a JSON column over its bound comes back as NULL with `<name>_over` set, so an
    oversized row is never copied into Python, let alone parsed."""
    parts = []
    for name in names:
        bound = MAX_JSON_CHARS if name in JSON_COLUMNS else MAX_TEXT_CHARS.get(name)
        if bound is None:
            parts.append(name)
        else:
            parts.append(f"CASE WHEN length({name}) > {bound} THEN NULL ELSE {name} END AS {name}")
            parts.append(f"length({name}) > {bound} AS {name}_over")
    return ", ".join(parts)


def decoded(record: dict) -> dict:
    """The row with its JSON columns decoded; the first column that is oversized, not JSON, or nested deeper than
    any stored value is named in `damaged`."""
    for key in list(record):
        if key.endswith("_over"):
            if record.pop(key):
                column = key[: -len("_over")]
                bound = MAX_JSON_CHARS if column in JSON_COLUMNS else MAX_TEXT_CHARS[column]
                record.setdefault("damaged", f"its {column} is longer than {bound:,} characters")
    for key in JSON_COLUMNS:
        if isinstance(record.get(key), str):
            try:
                record[key] = json.loads(record[key])
                _check_depth(record[key])
            except (ValueError, RecursionError) as exc:
                record[key] = None
                why = "nested too deeply" if isinstance(exc, RecursionError) else f"not JSON ({exc})"
                record.setdefault("damaged", f"its {key} is {why}")
    return record


def _check_depth(value: Any) -> None:
    """RecursionError when `value` nests deeper than MAX_DEPTH (checked without recursion)."""
    level = [value]
    for _ in range(MAX_DEPTH + 1):
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return
    raise RecursionError


def row_fault(table: str, record: dict) -> str | None:
    """Why a decoded row of `table` cannot be used (the column or config field at fault), or None."""
    for column, (types, nullable) in COLUMN_TYPES.get(table, {}).items():
        if column not in record:
            continue
        value = record[column]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            return f"its {column} is {_shown(value)}, not {' or '.join(t.__name__ for t in types)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"its {column} is {value}, not a finite number"
    if table == "jobs" and record["status"] not in JOB_STATES:
        return f"its status is {_shown(record['status'])}, not one of {', '.join(JOB_STATES)}"
    if table == "analyses":
        timings = record["summary"].setdefault("timings", {})
        if not isinstance(timings, dict) or not all(_finite(v) for v in timings.values()):
            return "its summary.timings is not a table of seconds"
    if table == "jobs" and isinstance(record["result"], dict):
        for key in RESULT_NUMBERS:
            value = record["result"].get(key)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                return f"its result.{key} is {_shown(value)}, not a number"
    if table in ("analyses", "jobs"):
        return _config_fault(table, record)
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _config_fault(table: str, record: dict) -> str | None:
    """Whether the stored config reads as its kind's config (types, known fields, values in range) and agrees with
    the row's own columns; a sound config replaces the stored one in today's shape, defaults filled in."""
    kind = _config_class(table, record)
    if kind is None:
        return f"its kind {_shown(record.get('kind'))} is not a kind of job this version runs"
    stored = record["config"]
    if kind is ExperimentConfig and isinstance(
        stored, dict
    ):  # the row's kind names the procedure of the oldest rows
        stored = {"procedure": record["kind"], **stored}
    try:
        config = config_from_dict(kind, stored)
        config.validate()
    except SospError as exc:
        return f"its config {str(exc).removeprefix(f'a stored {kind.__name__} ')}"
    setup = config.setup
    if kind is ExperimentConfig and config.procedure != record["kind"]:
        return f"its config is a {config.procedure} run, the row a {record['kind']} job"
    if table == "analyses":
        stored = (record["model_spec"], record["data_spec"], record["method"])
        if (setup.model_spec, setup.data_spec, config.method) != stored:
            return (
                f"its config names {setup.model_spec} on {setup.data_spec} by {config.method}, the row "
                f"{stored[0]} on {stored[1]} by {stored[2]}"
            )
    record["config"] = json.loads(json.dumps(asdict(config)))
    return None


def _config_class(table: str, record: dict) -> type | None:
    if table == "analyses":
        return AnalysisConfig
    kinds = {STUDY_KIND: StudyConfig, EXPAND_STUDY_KIND: ExpandStudyConfig}
    return kinds.get(record.get("kind")) or (ExperimentConfig if record.get("kind") in PROCEDURES else None)
