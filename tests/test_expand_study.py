"""The expand study: the plain net's trials set the size and the bottlenecks, every other run is pruned to that size."""

import json
import time

import pandas as pd
import pytest

from sosp_engine.experiments.bottlenecks import paper_widening
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.cli.main import main
from sosp_engine.nets.data import load_data
from sosp_engine.errors import SospError
from sosp_engine.experiments.expand_study import (
    ExpandStudy,
    ExpandStudyConfig,
    expand_table,
    run_key,
    unpruned_reference,
)
from sosp_engine.runs.jobs import submit_expand_study
from sosp_engine.runs.work import read_log
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.pruning.masks import layer_table, load_mask
from sosp_engine.progress import Cancelled
from sosp_engine.runs.store import Store

DIGITS = load_data("digits")
NARROW = "resnet20:widths=4,8,16"


def tiny(**kw) -> ExpandStudyConfig:
    settings = dict(
        model_spec=NARROW, trials=1, epochs=1, finetune_epochs=1, samples=40, batch_size=256, device="cpu"
    )
    return config_from_dict(ExpandStudyConfig, {**settings, **kw})


def test_the_plain_trial_sets_the_size_and_the_bottlenecks_every_other_run_uses(tmp_path):
    config = tiny(procedures=["expand-prune", "widen-prune", "train-prune", "init-prune"])
    summary = ExpandStudy(config, tmp_path, data=DIGITS).run()
    plan, runs = summary["plan"], {r["procedure"]: r for r in summary["runs"]}
    wb = open_workbench(ModelSetup(NARROW, DIGITS.spec), DIGITS)
    plain_mask = load_mask(tmp_path / "train-prune" / "trial0" / "mask.json", wb.structures)
    assert plan["widen"] == paper_widening(NARROW, layer_table(wb.structures, plain_mask))
    assert (
        runs["train-prune"]["bottlenecks"] == sorted(plan["widen"])
        and runs["widen-prune"]["bottlenecks"] is None
    )
    assert plan["target_params"] == runs["train-prune"]["params"]
    for procedure in ("expand-prune", "widen-prune", "init-prune"):
        assert abs(runs[procedure]["params"] - plan["target_params"]) <= 0.05 * plan["target_params"], (
            procedure
        )
    assert (
        runs["init-prune"]["test_acc_after_pruning"] is None
    )  # pruned before training: nothing to test after it


def test_a_given_widening_and_size_are_used_as_they_are(tmp_path):
    wb = open_workbench(ModelSetup(NARROW, DIGITS.spec), DIGITS)
    stage = layer_table(wb.structures).stage.iloc[-1]
    summary = ExpandStudy(
        tiny(procedures=["train-prune", "expand-prune"], widen={stage: 1.5}, target_params=9000),
        tmp_path,
        data=DIGITS,
    ).run()
    assert summary["plan"]["widen"] == {stage: 1.5} and summary["plan"]["target_params"] == 9000
    expanded = json.loads((tmp_path / "expand-prune" / "trial0" / "state.json").read_text())["done"]["widen"]
    assert expanded["factors"] == {stage: 1.5}


def test_a_killed_expand_study_resumes_without_redoing_finished_runs(tmp_path):
    config = tiny(procedures=["train-prune", "widen-prune"], trials=2)
    state = tmp_path / "state.json"

    def stop_after_three_runs() -> bool:
        return state.exists() and len(json.loads(state.read_text())["runs"]) >= 3

    with pytest.raises(Cancelled):
        ExpandStudy(config, tmp_path, should_stop=stop_after_three_runs, data=DIGITS).run()
    done = json.loads(state.read_text())["runs"]
    study = ExpandStudy(config, tmp_path, data=DIGITS)
    ran = []
    original = study.unit
    study.unit = lambda unit: ran.append(unit) or original(unit)
    summary = study.run()
    assert ran == [("run", "widen-prune", 1)] and len(summary["runs"]) == 4
    assert {k: v for k, v in study.state["runs"].items() if k in done} == done


def test_the_table_is_the_mean_and_std_over_trials_and_the_reference_the_unpruned_plain_net():
    runs = [
        {
            "procedure": p,
            "label": p,
            "trial": t,
            "test_acc": a,
            "test_acc_after_pruning": b,
            "params": 100,
            "macs": m,
            "unpruned_acc": u,
        }
        for p, t, a, b, m, u in (
            ("train-prune", 0, 0.8, 0.5, 10, 0.9),
            ("train-prune", 1, 0.6, 0.3, 20, 0.7),
            ("expand-prune", 0, 0.9, 0.6, 30, 0.95),
        )
    ]
    table = expand_table(runs).set_index("procedure")
    assert table.loc["train-prune", "test_acc_mean"] == pytest.approx(0.7)
    assert table.loc["train-prune", "test_acc_std"] == pytest.approx(pd.Series([0.8, 0.6]).std())
    assert table.loc["train-prune", "acc_after_pruning_mean"] == pytest.approx(0.4)
    assert table.loc["expand-prune", "trials"] == 1 and table.loc["expand-prune", "test_acc_std"] == 0.0
    plan = {"plain_params": 200, "plain_macs": 40}
    assert unpruned_reference(runs, plan) == {"params": 200, "macs": 40, "test_acc": pytest.approx(0.8)}
    assert unpruned_reference(runs[2:], plan) is None


@pytest.mark.parametrize(
    "bad",
    [
        dict(procedures=["expand-prune", "widen-prune"]),
        dict(procedures=["grow-prune"]),
        dict(trials=0),
        dict(widen_by=-1.0),
        dict(epochs=0),
        dict(ratio=1.5),
        dict(unit="flops"),
        dict(widen={"stage 1": float("nan")}),
    ],
)
def test_bad_expand_study_settings_are_refused_before_any_work(bad):
    # a NaN is refused when the config is read, the others when it is validated
    with pytest.raises(SospError):
        tiny(**bad).validate()


def test_a_widening_name_the_net_lacks_is_refused_at_submit_with_the_valid_names(tmp_path):
    with pytest.raises(Exception, match="stage 1"):
        submit_expand_study(Store(tmp_path / "ws"), tiny(widen={"stage 9": 2.0}), "bad")
    assert Store(tmp_path / "ws").jobs() == []


def test_an_expand_study_runs_as_a_job_and_the_cli_shows_and_exports_it(tmp_path, capsys):
    ws = ["--workspace", str(tmp_path / "ws")]
    assert (
        main(
            [
                "study",
                "expand",
                "--model",
                NARROW,
                "--trials",
                "1",
                "--epochs",
                "1",
                "--finetune-epochs",
                "1",
                "--samples",
                "40",
                "--batch-size",
                "256",
                "--device",
                "cpu",
                "--procedures",
                "train-prune,widen-prune",
                *ws,
            ]
        )
        == 0
    )
    job_id = json.loads(capsys.readouterr().out)["study"]
    store = Store(tmp_path / "ws")
    deadline = time.time() + 300
    while store.job(job_id)["status"] not in ("done", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
    assert store.job(job_id)["status"] == "done", read_log(store, job_id)
    assert main(["study", "show", job_id, *ws]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {r["procedure"] for r in shown["aggregate"]} == {"train-prune", "widen-prune"}
    assert shown["unpruned"]["params"] > shown["plan"]["target_params"]
    assert [a["name"] for a in store.analyses()] == [f"{store.job(job_id)['name']} (plain net, trial 0)"]
    assert main(["study", "export", job_id, "--out", str(tmp_path / "e.json"), *ws]) == 0
    exported = json.loads((tmp_path / "e.json").read_text())
    assert [run_key(r["procedure"], r["trial"]) for r in exported["runs"]] == [
        "train-prune/trial0",
        "widen-prune/trial0",
    ]
