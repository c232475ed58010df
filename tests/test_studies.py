import json
import time

import pandas as pd
import pytest
import torch

from sosp_engine.cli.main import main
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.nets.data import load_data
from sosp_engine.errors import AnalysisError
from sosp_engine.runs.jobs import submit_study
from sosp_engine.runs.work import read_log
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.progress import Cancelled
from sosp_engine.runs.store import Store
from sosp_engine.saliency.analysis import AnalysisResult
from sosp_engine.experiments.studies import Study, StudyConfig, aggregate, cell_key

DIGITS = load_data("digits")


def tiny(**kw) -> StudyConfig:
    settings = dict(
        methods=["sosp-h", "magnitude"],
        targets=[0.3, 0.6],
        seeds=[0, 1],
        epochs=1,
        finetune_epochs=1,
        samples=40,
        batch_size=256,
        device="cpu",
    )
    return config_from_dict(StudyConfig, {**settings, **kw})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.pt"
    torch.manual_seed(0)
    torch.save(open_workbench(ModelSetup("resnet20", DIGITS.spec), DIGITS).model.state_dict(), path)
    return str(path)


def test_aggregation_is_the_mean_and_std_over_seeds_of_known_records():
    cells = [
        {
            "seed": s,
            "method": "m",
            "target": 0.5,
            "acc_pruned": a,
            "acc_finetuned": f,
            "params": p,
            "macs": 10,
            "latency_cpu_ms": 1.0,
        }
        for s, a, f, p in ((0, 0.5, 0.9, 100), (1, 0.7, 0.8, 110))
    ]
    row = aggregate(cells).iloc[0]
    assert (
        row.seeds == 2 and row.acc_pruned_mean == pytest.approx(0.6) and row.params_mean == pytest.approx(105)
    )
    assert row.acc_finetuned_std == pytest.approx(pd.Series([0.9, 0.8]).std())
    assert aggregate(cells[:1]).iloc[0].acc_pruned_std == 0.0


def test_gpu_latency_is_aggregated_only_where_cells_ran_on_a_gpu():
    cells = [
        {
            "seed": s,
            "method": "m",
            "target": 0.5,
            "acc_pruned": 0.5,
            "acc_finetuned": 0.9,
            "params": 100,
            "macs": 10,
            "latency_cpu_ms": 1.0,
            "latency_gpu_ms": g,
        }
        for s, g in ((0, 0.2), (1, 0.4))
    ]
    assert aggregate(cells).iloc[0].latency_gpu_ms_mean == pytest.approx(0.3)
    on_cpu = [{**c, "latency_gpu_ms": None} for c in cells]
    assert "latency_gpu_ms_mean" not in aggregate(on_cpu)


def test_a_study_runs_every_cell_with_sizes_that_shrink_with_the_target(tmp_path, weights):
    summary = Study(tiny(weights=weights, finetune_epochs=0), tmp_path, data=DIGITS).run()
    cells = pd.DataFrame(summary["cells"])
    assert len(cells) == 8 and set(cells.method) == {"sosp-h", "magnitude"}
    for _, group in cells.groupby(["seed", "method"]):
        group = group.sort_values("target")
        assert group.params.is_monotonic_decreasing and (group.latency_cpu_ms > 0).all()
    assert (cells.acc_pruned == cells.acc_finetuned).all()  # no fine-tuning asked


def test_a_killed_study_resumes_without_redoing_finished_cells(tmp_path, weights):
    config = tiny(weights=weights, finetune_epochs=0, seeds=[0])
    calls = {"n": 0}

    def stop_after_two_cells() -> bool:
        return (
            len(json.loads((tmp_path / "state.json").read_text())["cells"]) >= 2
            if (tmp_path / "state.json").exists()
            else False
        )

    with pytest.raises(Cancelled):
        Study(config, tmp_path, should_stop=stop_after_two_cells, data=DIGITS).run()
    done = json.loads((tmp_path / "state.json").read_text())["cells"]
    assert len(done) == 2
    study = Study(config, tmp_path, data=DIGITS)
    original = study._cell

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    study._cell = counting
    summary = study.run()
    assert calls["n"] == 2 and len(summary["cells"]) == 4
    assert {k: v for k, v in study.state["cells"].items() if k in done} == done


def test_bad_study_settings_are_refused_before_any_work():
    for bad in (
        dict(methods=["sosp-x"]),
        dict(targets=[1.2]),
        dict(seeds=[0, 0]),
        dict(unit="flops"),
        dict(weights=None, epochs=0),
    ):
        with pytest.raises(AnalysisError):
            tiny(**bad).validate()


def test_a_study_runs_as_a_job_and_the_cli_shows_and_exports_it(tmp_path, weights, capsys):
    store = Store(tmp_path / "ws")
    job_id = submit_study(store, tiny(weights=weights, seeds=[0], targets=[0.5]), "tiny study")
    deadline = time.time() + 300
    while store.job(job_id)["status"] not in ("done", "failed", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
    assert store.job(job_id)["status"] == "done", read_log(store, job_id)
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main(["study", "show", job_id, *ws]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in shown["aggregate"]] == ["sosp-h", "magnitude"]
    assert main(["study", "export", job_id, "--out", str(tmp_path / "s.csv"), *ws]) == 0
    assert pd.read_csv(tmp_path / "s.csv").shape[0] == 2
    assert cell_key(0, "sosp-h", 0.5) == "seed0/sosp-h/0.5"


def test_a_latency_study_measures_each_analysis_profile_once_and_slices_it(tmp_path, weights, quiet_machine):
    from sosp_engine.latency.profile import LatencyProfile

    config = tiny(
        weights=weights,
        finetune_epochs=0,
        seeds=[0],
        methods=["magnitude"],
        targets=[0.02, 0.04],
        unit="latency",
    )
    summary = Study(config, tmp_path, data=DIGITS).run()
    profile = LatencyProfile.load(tmp_path / "seed0" / "magnitude" / "latency.json")
    result = AnalysisResult.load(tmp_path / "seed0" / "magnitude")
    for cell in summary["cells"]:
        assert cell["structures_pruned"] == profile.prefix_for(cell["target"], result.n_prunable)


def test_a_done_study_whose_state_this_machine_cannot_see_is_an_error_not_an_empty_table(tmp_path):
    from sosp_engine.runs.study_state import study_cells

    job = {
        "id": "s1",
        "status": "done",
        "run_dir": str(tmp_path / "elsewhere" / "run"),
        "path": str(tmp_path),
    }
    with pytest.raises(AnalysisError, match="must be storage every node and this machine reach"):
        study_cells(job)
    assert study_cells({**job, "status": "running"}) == []  # before its first cell, nothing to show yet
