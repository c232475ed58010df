"""Hostile input, third round, class 1: every stored row is validated alone when it is read. A bad row is one damaged
row (its id and the field at fault), every other row is listed and usable, and nothing parses an oversized row."""

import json
import sqlite3

import pytest

from sosp_engine.cli.main import main
from sosp_engine.runs.store import Store
from sosp_engine.runs.rows import MAX_JSON_CHARS

GOOD = {"procedure": "train", "setup": {"model_spec": "resnet20"}, "training": {"epochs": 1}}


def edit(store: Store, table: str, record_id: str, **columns) -> None:
    """What a hand, a tool or a half-finished copy does to the database behind the engine's back."""
    with sqlite3.connect(store.db_path) as conn:
        assignments = ", ".join(f"{key} = ?" for key in columns)
        conn.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", (*columns.values(), record_id))


def two_jobs(tmp_path) -> tuple[Store, str, str]:
    store = Store(tmp_path / "ws")
    return store, store.add_job("train", "good", GOOD), store.add_job("train", "bad", GOOD)


def with_training(value) -> str:
    return json.dumps({**GOOD, "training": {"epochs": value}})


BAD_JOB_ROWS = {
    "config nested 100,000 deep": ({"config": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
    "config nested 40 deep": (
        {"config": json.dumps({**GOOD, "label": json.loads("[" * 40 + "]" * 40)})},
        "nested too deeply",
    ),
    "config not JSON": ({"config": "{oops"}, "not JSON"),
    "config a list": ({"config": "[1, 2]"}, "not dict"),
    "epochs a string": ({"config": with_training("5")}, "training.epochs"),
    "epochs a float": ({"config": with_training(1.5)}, "training.epochs"),
    "samples NaN": (
        {"config": json.dumps({**GOOD, "analysis": {"samples": float("nan")}})},
        "analysis.samples",
    ),
    "lr infinite": ({"config": json.dumps({**GOOD, "training": {"lr": float("inf")}})}, "training.lr"),
    "model spec a list": (
        {"config": json.dumps({**GOOD, "setup": {"model_spec": ["x"]}})},
        "setup.model_spec",
    ),
    "unknown field": ({"config": json.dumps({**GOOD, "surprise": 1})}, "surprise"),
    "epochs out of range": ({"config": with_training(-3)}, "epoch"),
    "procedure of another kind": (
        {"config": json.dumps({**GOOD, "procedure": "train-prune"})},
        "train-prune",
    ),
    "kind unknown": ({"kind": "mine-bitcoin"}, "kind"),
    "status unknown": ({"status": "zombie"}, "status"),
    "created a word": ({"created": "yesterday"}, "created"),
    "progress a string": ({"progress": "half"}, "progress"),
    "name of 2,000 characters": ({"name": "n" * 2000}, "name is longer"),
    "config over the size bound": (
        {"config": json.dumps({**GOOD, "label": "x" * MAX_JSON_CHARS})},
        "config is longer",
    ),
    "result a string": ({"result": '"done"'}, "result"),
    "test accuracy a word": ({"result": '{"test_acc": "high"}'}, "result.test_acc"),
}


@pytest.mark.parametrize("case", list(BAD_JOB_ROWS))
def test_a_bad_job_row_is_one_damaged_row_naming_the_field_and_the_others_stay_listed(tmp_path, case):
    store, good, bad = two_jobs(tmp_path)
    columns, fault = BAD_JOB_ROWS[case]
    edit(store, "jobs", bad, **columns)
    damaged: list[str] = []
    assert [job["id"] for job in store.jobs(damaged=damaged)] == [good]
    assert len(damaged) == 1 and damaged[0].startswith(f"{bad}: ") and fault in damaged[0]


def test_jobs_list_prints_the_damaged_row_with_its_id_and_every_good_one(tmp_path, capsys):
    store, good, bad = two_jobs(tmp_path)
    edit(store, "jobs", bad, config="[" * 100_000 + "]" * 100_000)
    assert main(["jobs", "list", "--workspace", str(store.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(good) and "good" in line for line in out)
    assert any(line.startswith(f"{bad}  damaged") and "nested too deeply" in line for line in out)


def test_a_damaged_queued_job_never_holds_up_the_good_ones_behind_it(tmp_path):
    store, good, bad = Store(tmp_path / "ws"), None, None
    bad = store.add_job("train", "bad", GOOD)
    good = store.add_job("train", "good", GOOD)
    edit(store, "jobs", bad, config=json.dumps({**GOOD, "setup": {"model_spec": ["x"]}}))
    assert [job["id"] for job in store.claim_queued_jobs(limit=1)] == [good]
    assert store.jobs(status="queued") == []


def test_an_oversized_row_is_never_copied_into_python(tmp_path, monkeypatch):
    store, good, bad = two_jobs(tmp_path)
    edit(store, "jobs", bad, config="x" * (MAX_JSON_CHARS + 1))
    seen = []
    monkeypatch.setattr("sosp_engine.runs.rows.json.loads", lambda text: seen.append(len(text)) or {})
    store.jobs()
    assert max(seen) < 10_000


def test_an_analysis_row_whose_config_is_empty_is_damaged_and_the_others_listed(tmp_path):
    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench
    from sosp_engine.runs.records import store_analysis
    from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis

    store = Store(tmp_path / "ws")
    result = run_analysis(
        open_workbench(ModelSetup("resnet20x0.25", "digits")), AnalysisConfig(method="magnitude", samples=4)
    )
    good, bad = store_analysis(store, result, "good"), store_analysis(store, result, "bad")
    edit(store, "analyses", bad, config="{}")
    damaged: list[str] = []
    assert [record["id"] for record in store.analyses(damaged=damaged)] == [good]
    assert damaged[0].startswith(bad) and "resnet20x0.25" in damaged[0]


def test_study_list_lists_every_study_beside_a_damaged_one(tmp_path, capsys):
    from dataclasses import asdict

    from sosp_engine.experiments.studies import STUDY_KIND, StudyConfig

    store = Store(tmp_path / "ws")
    good = store.add_job(STUDY_KIND, "good study", asdict(StudyConfig()))
    bad = store.add_job(STUDY_KIND, "bad study", asdict(StudyConfig()))
    edit(store, "jobs", bad, config=json.dumps({**asdict(StudyConfig()), "methods": 7}))
    assert main(["study", "list", "--workspace", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert f"{good}  queued" in out and "good study" in out
    assert f"{bad}  damaged" in out and "methods" in out
