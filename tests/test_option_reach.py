"""Each option is declared once and reaches every front end that runs its kind of work: the verbs' flags and help,
the dashboard's forms, validation and the stored JSON."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from typing import Annotated

import pytest
from pydantic import Field
from streamlit.testing.v1 import AppTest

from conftest import ROOT, wait_for_state
from sosp_engine.experiments import training as training_module
from sosp_engine.experiments.front_ends import NOT_OFFERED, not_offered
from sosp_engine.runs.store import Store
from sosp_engine.saliency import analysis as analysis_module

from sosp_engine.cli import args as cli_args
from sosp_engine.cli.main import build_parser
from sosp_engine.errors import AnalysisError, SospError
from sosp_engine.experiments.training import TrainConfig, TrainingError
from sosp_engine.nets.setup import config_from_dict, stored_config
from sosp_engine.options import options_of
from sosp_engine.saliency.analysis import AnalysisOptions, AnalysisResult

ANALYSIS_VERBS = ("analyze", "expand", "jobs submit", "study submit", "study expand")
TRAINING_VERBS = ("train", "finetune", "expand", "jobs submit", "study submit", "study expand")


@stored_config
@dataclasses.dataclass
class DampedOptions(AnalysisOptions):
    """A new SOSP-H knob, declared the one way a knob is declared."""

    damping: Annotated[
        float, Field(ge=0, title="Damping", description="added to the curvature's diagonal")
    ] = 0.0


@stored_config
@dataclasses.dataclass
class WarmupConfig(TrainConfig):
    warmup_epochs: Annotated[
        int, Field(ge=0, title="Warm-up epochs", description="epochs of linear warm-up")
    ] = 0


def help_of(verb: str) -> str:
    """What `python -m sosp_engine VERB --help` prints, on one line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*verb.split(), "--help"])
    return " ".join(out.getvalue().split())


def unwrapped(text: str) -> str:
    """Text without its spaces (argparse wraps lines inside hyphenated words too)."""
    return re.sub(r"\s+", "", text)


def flags_of(helptext: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*", helptext))


def test_every_analysis_option_is_a_flag_of_every_analysis_verb_or_named_as_not_offered_in_its_help():
    for verb in ANALYSIS_VERBS:
        helptext, skipped = help_of(verb), not_offered(AnalysisOptions, verb)
        for option in options_of(AnalysisOptions):
            if option.name in skipped:
                said = unwrapped(f"AnalysisOptions.{option.name}: {skipped[option.name]}")
                assert said in unwrapped(helptext), (verb, option.name)
            else:  # beside a training option of the same name it is --analysis-NAME
                assert {option.flags[0], "--analysis-" + option.flags[0][2:]} & flags_of(helptext), (
                    verb,
                    option.name,
                )


def test_every_training_option_is_a_flag_of_every_training_verb_or_named_as_not_offered_in_its_help():
    for verb in TRAINING_VERBS:
        helptext, skipped = help_of(verb), not_offered(TrainConfig, verb)
        for option in options_of(TrainConfig):
            if option.name in skipped:
                assert unwrapped(f"TrainConfig.{option.name}: {skipped[option.name]}") in unwrapped(helptext)
            else:
                assert option.flags[0] in flags_of(helptext), (verb, option.name)


def test_the_options_a_front_end_leaves_out_are_the_reviewed_list():
    left_out = {(cls.__name__, where): sorted(names) for (cls, where), names in NOT_OFFERED.items()}
    everything = sorted(o.name for o in options_of(AnalysisOptions))
    assert left_out == {
        ("AnalysisOptions", "expand"): ["at_init", "latency_device", "seed"],
        ("AnalysisOptions", "jobs submit"): ["at_init", "latency_device", "seed"],
        ("AnalysisOptions", "study expand"): ["at_init", "latency_device", "seed"],
        ("AnalysisOptions", "study submit"): ["latency_device", "method", "seed"],
        ("TrainConfig", "train"): ["device"],
        ("TrainConfig", "finetune"): ["device"],
        ("TrainConfig", "expand"): ["device"],
        ("TrainConfig", "jobs submit"): ["device"],
        ("TrainConfig", "study submit"): ["device", "seed"],
        ("TrainConfig", "study expand"): ["device", "seed"],
        ("TrainConfig", "Model page"): ["device"],
        ("AnalysisOptions", "Studies page"): ["latency_device", "method", "seed"],
        ("TrainConfig", "Studies page"): ["device", "seed"],
        ("AnalysisOptions", "Expand page"): everything,
        ("TrainConfig", "Expand page"): ["device", "seed"],
    }


def test_a_new_analysis_knob_reaches_every_analysis_verb_from_its_declaration(monkeypatch):
    monkeypatch.setattr(cli_args, "AnalysisOptions", DampedOptions)
    for verb in ANALYSIS_VERBS:
        assert "--damping DAMPING added to the curvature's diagonal (at least 0); default 0.0" in help_of(
            verb
        ), verb
    given = build_parser().parse_args(["analyze", "--model", "resnet20", "--out", "x", "--damping", "0.5"])
    assert cli_args.analysis_options_from(given).damping == 0.5


def test_a_new_training_knob_reaches_every_training_verb_from_its_declaration(monkeypatch):
    monkeypatch.setattr(cli_args, "TrainConfig", WarmupConfig)
    for verb in TRAINING_VERBS:
        assert "--warmup-epochs" in flags_of(help_of(verb)), verb
    given = build_parser().parse_args(
        ["train", "--model", "resnet20", "--save", "w.pt", "--warmup-epochs", "3"]
    )
    assert cli_args.train_config_from(given).warmup_epochs == 3


def test_a_flag_value_outside_its_declared_choices_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--model", "resnet20", "--out", "x", "--normalize", "flops"])
    assert "--normalize: invalid choice: 'flops'" in capsys.readouterr().err


def test_a_flag_value_of_the_wrong_kind_is_refused_with_what_it_takes(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--model", "resnet20", "--out", "x", "--samples", "many"])
    assert "--samples: takes a whole number, got 'many'" in capsys.readouterr().err


def test_training_options_that_reached_no_verb_before_are_flags_now():
    given = build_parser().parse_args(
        ["train", "--model", "resnet20", "--save", "w.pt", "--momentum", "0.8", "--weight-decay", "5e-4"]
        + ["--milestones", "0.5", "0.75", "--no-amp"]
    )
    config = cli_args.train_config_from(given)
    assert (config.momentum, config.weight_decay, config.milestones, config.amp) == (
        0.8,
        5e-4,
        (0.5, 0.75),
        False,
    )


def test_the_analysis_and_training_seeds_of_an_experiment_verb_are_two_flags():
    given = build_parser().parse_args(
        ["expand", "--model", "resnet20", "--out", "o", "--seed", "3", "--batch-size", "64"]
        + ["--analysis-batch-size", "20", "--samples", "40"]
    )
    config = cli_args.experiment_config(given, "train-prune")
    assert (config.training.seed, config.training.batch_size) == (3, 64)
    assert (config.analysis.batch_size, config.analysis.samples) == (20, 40)


def test_a_new_knob_is_stored_and_read_back_and_a_bad_stored_value_names_the_field():
    stored = dataclasses.asdict(DampedOptions(damping=0.25))
    assert config_from_dict(DampedOptions, stored).damping == 0.25
    with pytest.raises(
        SospError, match=r"wrong value at damping: .*greater than or equal to 0 \(got -1\.0\)"
    ):
        config_from_dict(DampedOptions, {**stored, "damping": -1.0})
    with pytest.raises(AnalysisError, match="wrong value at damping"):
        DampedOptions(damping=-1.0).validate()


@pytest.mark.parametrize(
    ("config", "error", "field"),
    [
        (AnalysisOptions(samples=0), AnalysisError, "samples"),
        (AnalysisOptions(cap=1.5), AnalysisError, "cap"),
        (AnalysisOptions(memory_budget_gb=-2.0), AnalysisError, "memory_budget_gb"),
        (AnalysisOptions(mc_labels=-2), AnalysisError, "mc_labels"),
        (TrainConfig(momentum=1.0), TrainingError, "momentum"),
        (TrainConfig(milestones=(0.5, 1.5)), TrainingError, "milestones.1"),
        (TrainConfig(nproc=0), TrainingError, "nproc"),
    ],
)
def test_a_value_outside_its_declaration_is_refused_naming_the_field_and_the_value(config, error, field):
    with pytest.raises(error, match=rf"wrong value at {field}: .*\(got "):
        config.validate()


def test_the_memory_budget_takes_auto_and_resolves_it_where_the_analysis_runs():
    import torch

    from sosp_engine.saliency.memory import budget_bytes, default_budget

    AnalysisOptions(memory_budget_gb="auto").validate()
    assert budget_bytes("auto", torch.device("cpu")) == pytest.approx(
        default_budget(torch.device("cpu")), rel=0.2
    )
    assert budget_bytes(1.5, torch.device("cpu")) == 1.5 * 2**30


# --- the dashboard's forms ---------------------------------------------------------------------------------------
def open_page(page: str, workspace, monkeypatch) -> AppTest:
    monkeypatch.setenv("SOSP_WORKSPACE", str(workspace))
    at = AppTest.from_file(str(ROOT / "app" / "dashboard.py"), default_timeout=120)
    at.run()
    if page != "model":
        at.switch_page(f"../pages/{page}.py").run()
    assert not at.exception and not at.error, (at.exception, at.error)
    return at


def labels(at: AppTest) -> set[str]:
    return {w.label for kind in (at.number_input, at.text_input, at.selectbox, at.toggle) for w in kind}


@pytest.mark.parametrize("page", ["analyse", "studies"])
def test_a_new_analysis_knob_reaches_the_forms_that_launch_analyses(page, tmp_path, monkeypatch):
    monkeypatch.setattr(analysis_module, "AnalysisOptions", DampedOptions)
    assert "Damping" in labels(open_page(page, tmp_path / "ws", monkeypatch))


@pytest.mark.parametrize("page", ["model", "studies"])
def test_a_new_training_knob_reaches_the_forms_that_launch_trainings(page, tmp_path, monkeypatch):
    monkeypatch.setattr(training_module, "TrainConfig", WarmupConfig)
    assert "Warm-up epochs" in labels(open_page(page, tmp_path / "ws", monkeypatch))


def test_a_page_names_the_options_it_leaves_out_with_the_reasons(tmp_path, monkeypatch):
    at = open_page("studies", tmp_path / "ws", monkeypatch)
    captions = re.sub(r"\\(.)", r"\1", " ".join(c.value for c in at.caption))  # as shown: escapes removed
    assert "Not offered here: Method: the study runs every method chosen under Methods" in captions


def test_an_option_under_more_options_reaches_the_stored_analysis(tmp_path, monkeypatch):
    at = open_page("analyse", tmp_path / "ws", monkeypatch)
    next(w for w in at.number_input if w.label == "Samples N'").set_value(20)
    next(w for w in at.number_input if w.label == "Round widths to").set_value(2)
    next(w for w in at.text_input if w.label == "Memory budget (GB)").set_value("none")
    next(w for w in at.button if w.label == "Run analysis").click().run()
    store = Store(tmp_path / "ws")
    wait_for_state(store.analyses, 300, lambda: "the analysis was never stored")
    config = AnalysisResult.load(store.analyses()[0]["path"]).config
    assert (config.round_to, config.memory_budget_gb, config.samples) == (2, None, 20)


def test_a_form_value_that_does_not_parse_is_an_error_naming_the_option(tmp_path, monkeypatch):
    at = open_page("analyse", tmp_path / "ws", monkeypatch)
    next(w for w in at.text_input if w.label == "Memory budget (GB)").set_value("lots")
    next(w for w in at.button if w.label == "Run analysis").click().run()
    assert at.error and "Memory budget (GB) takes a number or auto or none, got 'lots'" in at.error[0].value


def test_the_dashboards_workbench_keeps_every_field_of_the_setup():
    from app.state import setup_workbench
    from sosp_engine.nets.setup import ModelSetup

    setup = ModelSetup("resnet20", "synthetic:3,8,8:10", None, ("layer3.*",), "none", "cpu")
    assert setup_workbench(setup).setup == setup


def test_a_knob_declared_on_the_options_reaches_its_methods_kernel_whole(monkeypatch):
    import torch

    from sosp_engine.pruning.workbench import open_workbench
    from sosp_engine.saliency import methods
    from sosp_engine.saliency.common import AnalysisInputs
    from sosp_engine.nets.setup import ModelSetup

    seen = []

    def damped(inputs, options):  # the kernel's one edit: it reads the declared knob
        seen.append(options.damping)
        return methods.SaliencyTerms(torch.arange(inputs.structures.num_structures, dtype=torch.float64))

    monkeypatch.setitem(
        methods.REGISTRY, "magnitude", dataclasses.replace(methods.REGISTRY["magnitude"], terms=damped)
    )
    wb = open_workbench(ModelSetup("resnet20", "synthetic:3,8,8:10"))
    x, y = wb.data.analysis_samples(4)
    inputs = AnalysisInputs(wb.model.eval(), wb.structures, x, y, "cross-entropy", 4)
    analysis_module.compute_saliency(inputs, DampedOptions(method="magnitude", damping=0.5), "none")
    assert seen == [0.5]


MODEL_VERBS = (
    "info",
    "prune",
    "analyze",
    "train",
    "finetune",
    "expand",
    "jobs submit",
    "study submit",
    "study expand",
)


def test_every_field_of_the_model_setup_is_a_flag_of_every_verb_that_opens_a_model():
    from sosp_engine.nets.setup import ModelSetup

    for verb in MODEL_VERBS:
        flags = flags_of(help_of(verb))
        assert all(option.flags[0] in flags for option in options_of(ModelSetup)), verb


def test_the_setup_flags_give_the_setup_they_say():
    from sosp_engine.nets.setup import ModelSetup

    given = build_parser().parse_args(
        [
            "info",
            "--model",
            "vgg19",
            "--data",
            "synthetic:3,8,8:10",
            "--weights",
            "w.pt",
            "--exclude",
            "features.0",
        ]
        + ["--preset", "none", "--device", "cpu"]
    )
    assert cli_args.setup_from(given) == ModelSetup(
        "vgg19", "synthetic:3,8,8:10", "w.pt", ("features.0",), None, "cpu"
    )


def test_the_model_pages_more_options_load_a_setup_with_exclusions(tmp_path, monkeypatch):
    at = open_page("model", tmp_path / "ws", monkeypatch)
    before = next(m for m in at.metric if m.label == "Structures").value
    next(w for w in at.text_input if w.label == "Never pruned").set_value("layer3.*")
    next(w for w in at.button if w.label == "Load model").click().run()
    assert not at.exception and not at.error
    after = next(m for m in at.metric if m.label == "Structures").value
    assert int(after.replace(",", "")) < int(before.replace(",", ""))
    assert (
        next(w for w in at.text_input if w.label == "Never pruned").value == "layer3.*"
    )  # the form shows it


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (AnalysisOptions, "cap", 1.5),
        (AnalysisOptions, "normalize", "flops"),
        (AnalysisOptions, "samples", "many"),
        (TrainConfig, "momentum", -0.1),
        (TrainConfig, "milestones", [0.5, 2.0]),
    ],
)
def test_a_hand_edited_stored_config_with_a_bad_value_is_refused_naming_the_field(cls, field, value):
    stored = {**dataclasses.asdict(cls()), field: value}
    with pytest.raises(SospError, match=rf"a stored {cls.__name__} has a wrong value at {field}"):
        config_from_dict(cls, stored)


@pytest.mark.parametrize("page", ["model", "studies"])
def test_the_pages_that_open_a_model_offer_every_field_of_its_setup(page, tmp_path, monkeypatch):
    shown = labels(open_page(page, tmp_path / "ws", monkeypatch))
    assert {"Never pruned", "Exclusion preset", "Device"} <= shown


def test_a_small_float_option_shows_at_its_own_scale(tmp_path, monkeypatch):
    at = open_page("studies", tmp_path / "ws", monkeypatch)
    decay = next(w for w in at.number_input if w.label == "Weight decay")
    assert decay.value == 1e-4 and decay.proto.format == "%g" and decay.step == pytest.approx(1e-4)
