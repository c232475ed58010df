"""One model setup nested in every config; configs stored before it was nested (their fields flat) still open."""

import dataclasses
import json

import pytest
import torch

from sosp_engine.experiments.expand_study import ExpandStudyConfig
from sosp_engine.experiments.procedures import ExperimentConfig
from sosp_engine.experiments.studies import StudyConfig
from sosp_engine.experiments.training import TrainConfig
from sosp_engine.errors import SospError
from sosp_engine.nets.setup import ModelSetup, config_from_dict, stored_setup
from sosp_engine.pruning.masks import layer_table
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.saliency.analysis import AnalysisConfig, AnalysisOptions, AnalysisResult, run_analysis

SETUP = ModelSetup("resnet20:widths=4,8,16", "synthetic:3,8,8:10", None, ("layer3.*",), "none", "cpu")


@pytest.fixture(scope="module")
def workbench():
    torch.manual_seed(0)
    return open_workbench(ModelSetup("resnet20", "synthetic:3,8,8:10"))


@pytest.mark.parametrize("config_type", [AnalysisConfig, ExperimentConfig, StudyConfig, ExpandStudyConfig])
def test_every_config_nests_the_one_model_setup(config_type):
    kinds = {f.name: f.type for f in dataclasses.fields(config_type)}
    assert kinds["setup"] in (ModelSetup, "ModelSetup")
    assert not {"model_spec", "data_spec", "weights", "exclude", "preset", "device"} & set(kinds)


@pytest.mark.parametrize(
    "config",
    [
        AnalysisConfig(method="sosp-i", min_channels=3, setup=SETUP),
        ExperimentConfig("expand-prune", SETUP, TrainConfig(epochs=2, lr=0.05), AnalysisOptions(samples=9)),
        StudyConfig(
            SETUP, ["sosp-h"], [0.5], "params", [4], TrainConfig(epochs=1), 2, AnalysisOptions(cap=0.5)
        ),
        ExpandStudyConfig(SETUP, trials=2, widen={"stage 1": 2.0}, analysis=AnalysisOptions(min_channels=2)),
    ],
    ids=["analysis", "experiment", "study", "expand-study"],
)
def test_a_stored_config_reads_back_equal(config):
    assert config_from_dict(type(config), json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_a_job_config_stored_flat_by_an_earlier_version_reads_into_its_parts():
    flat = {
        "procedure": "train-prune",
        "model_spec": "resnet32",
        "data_spec": "digits",
        "weights": None,
        "epochs": 7,
        "finetune_epochs": None,
        "method": "sosp-i",
        "samples": 300,
        "ratio": 0.4,
        "unit": "params",
        "target_params": None,
        "cap": 0.9,
        "normalize": "kernel",
        "widen": {},
        "widen_factor": None,
        "match_widen": {},
        "lr": 0.05,
        "batch_size": 64,
        "schedule": "cosine",
        "seed": 3,
        "device": "cpu",
        "exclude": ["fc"],
        "preset": "auto",
        "label": "x",
        "nproc": 1,
        "sync_bn": False,
        "latency_runtime": "eager",
    }
    config = config_from_dict(ExperimentConfig, flat)
    assert config.setup == ModelSetup("resnet32", "digits", None, ("fc",), "auto", "cpu")
    assert (config.training.epochs, config.training.lr, config.training.batch_size) == (7, 0.05, 64)
    assert (config.training.schedule, config.training.seed) == ("cosine", 3)
    assert (config.analysis.method, config.analysis.samples, config.analysis.cap) == ("sosp-i", 300, 0.9)
    assert config.analysis.normalize == "kernel" and (config.ratio, config.label) == (0.4, "x")
    assert stored_setup(flat) == stored_setup(dataclasses.asdict(config)) == config.setup


def test_a_study_stored_flat_by_an_earlier_version_reads_into_its_parts():
    flat = {"model_spec": "resnet20", "data_spec": "digits", "weights": "w.pt", "methods": ["sosp-h"]}
    flat |= {
        "targets": [0.5],
        "unit": "params",
        "seeds": [0],
        "epochs": 3,
        "finetune_epochs": 1,
        "samples": 40,
    }
    flat |= {"cap": 0.8, "normalize": "none", "lr": 0.1, "batch_size": 32, "device": "cpu", "exclude": []}
    flat |= {"preset": "auto", "nproc": 1, "sync_bn": False, "latency_runtime": "eager"}
    config = config_from_dict(StudyConfig, flat)
    assert config.setup.weights == "w.pt" and config.training.batch_size == 32 and config.analysis.cap == 0.8
    expand = config_from_dict(
        ExpandStudyConfig, {"model_spec": "resnet20", "method": "magnitude", "epochs": 2, "trials": 1}
    )
    assert expand.analysis.method == "magnitude" and expand.training.epochs == 2 and expand.trials == 1


def test_an_analysis_stored_flat_by_an_earlier_version_opens(workbench, tmp_path):
    result = run_analysis(workbench, AnalysisConfig(method="magnitude", samples=8))
    folder = result.save(tmp_path / "a")
    meta = json.loads((folder / "analysis.json").read_text())
    setup = meta["config"].pop("setup")
    meta["config"] |= {**setup, "exclude": list(setup["exclude"])}
    del meta["config"]["min_channels"]  # an option that version did not have: its default applies
    (folder / "analysis.json").write_text(json.dumps(meta))
    opened = AnalysisResult.load(folder)
    assert opened.config.setup == result.config.setup and opened.config.min_channels == 1
    assert torch.equal(opened.pruning_order, result.pruning_order)


def test_a_stored_config_with_a_field_this_version_does_not_know_is_a_clear_error():
    with pytest.raises(SospError, match="does not know: colour"):
        config_from_dict(ExperimentConfig, {"procedure": "train", "colour": "red"})


def test_the_analysis_records_the_workbench_setup_not_a_default(workbench):
    result = run_analysis(workbench, AnalysisOptions(method="random", samples=8))
    assert result.config.setup == workbench.setup


def test_a_minimum_width_keeps_that_many_structures_of_every_layer(workbench):
    result = run_analysis(workbench, AnalysisConfig(method="magnitude", samples=8, cap=1.0, min_channels=5))
    table = layer_table(workbench.structures, result.mask(workbench.structures, result.max_ratio - 1e-9))
    assert (table.kept >= table.channels.clip(upper=5)).all() and (table.kept == 5).any()


def test_the_options_of_an_experiment_reach_its_analysis():
    config = ExperimentConfig(
        "train-prune", SETUP, TrainConfig(epochs=1, seed=4), AnalysisOptions(min_channels=3)
    )
    analysis = AnalysisConfig.of(config.setup, config.analysis, seed=config.seed)
    assert (analysis.min_channels, analysis.seed, analysis.setup) == (3, 4, SETUP)
    assert config.train_config(2, 1) == TrainConfig(epochs=2, lr=0.1, seed=5, device="cpu")
