"""Every page through streamlit.testing.v1.AppTest: renders, reacts to the key interactions, shows st.error on bad input."""

import re
import time

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import ROOT
from sosp_engine.saliency.analysis import AnalysisConfig, AnalysisResult, run_analysis
from sosp_engine.nets.setup import config_from_dict
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.runs.records import store_analysis
from sosp_engine.runs.store import Store

PAGES = ["model", "analyse", "ratios", "compare", "bottlenecks", "expand", "studies", "runs"]


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app" / "dashboard.py"), default_timeout=120)
    at.run()
    if page != "model":
        at.switch_page(f"../pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def shown(markdown: str) -> str:
    """The text a markdown source shows: backslash escapes removed."""
    return re.sub(r"\\(.)", r"\1", markdown)


def widget(elements, label):
    return next(w for w in elements if w.label == label)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SOSP_WORKSPACE", str(tmp_path / "ws"))
    return Store(tmp_path / "ws")


@pytest.fixture(scope="module")
def stored_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stored") / "ws"
    store = Store(root)
    torch.manual_seed(0)
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    store_analysis(store, run_analysis(wb, AnalysisConfig(method="sosp-h", samples=60)), "after training")
    store_analysis(
        store, run_analysis(wb, AnalysisConfig(method="sosp-h", samples=60, at_init=True)), "at init"
    )
    return root


@pytest.fixture
def stored(stored_root, monkeypatch):
    monkeypatch.setenv("SOSP_WORKSPACE", str(stored_root))
    return Store(stored_root)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_a_fresh_workspace(fresh, page):
    at = open_page(page)
    assert not at.error


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_stored_analyses(stored, page):
    at = open_page(page)
    assert not at.error, [e.value for e in at.error]


def test_model_page_shows_the_demo_summary(fresh):
    at = open_page("model")
    values = {m.label: m.value for m in at.metric}
    assert values["Parameters"] == "272,186" and values["Prunable layers"] == "10"


def test_model_page_computes_test_accuracy_on_demand(fresh):
    at = open_page("model")
    widget(at.button, "Test accuracy").click().run()
    assert any(m.label == "Test accuracy" for m in at.metric)


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("Model spec", "resnet57", "unknown model"),
        ("Data spec", "cifar10:/no/such/folder", "does not exist"),
    ],
)
def test_bad_model_inputs_show_an_error(fresh, field, value, fragment):
    at = open_page("model")
    widget(at.text_input, field).set_value(value)
    widget(at.button, "Load model").click().run()
    assert at.error and fragment in at.error[0].value and not at.exception


def test_a_mismatched_checkpoint_shows_an_error(fresh, tmp_path):
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    at = open_page("model")
    widget(at.selectbox, "Weights").set_value("checkpoint path")
    widget(at.text_input, "Checkpoint path (for 'checkpoint path')").set_value(str(tmp_path / "bad.pt"))
    widget(at.button, "Load model").click().run()
    assert at.error and "does not fit the model" in at.error[0].value


def test_running_an_analysis_on_digits_stores_it(fresh):
    at = open_page("analyse")
    widget(at.number_input, "Samples N'").set_value(50)
    widget(at.text_input, "Name (optional)").set_value("my first")
    widget(at.button, "Run analysis").click().run()
    until_stored(at, fresh)
    assert not at.error and any("Stored as **my first**" in s.value for s in at.success)
    assert any("MiB per sample" in s.value for s in at.success)  # the batch was fitted to the free memory
    assert [r["name"] for r in fresh.analyses()] == ["my first"]
    assert "my first" in at.dataframe[-1].value["name"].tolist()  # the table on the page lists it too


def test_an_analysis_normalised_by_measured_latency_stores_its_setting(fresh):
    at = open_page("analyse")
    widget(at.number_input, "Samples N'").set_value(20)
    widget(at.selectbox, "Normalisation").set_value("latency")
    widget(at.number_input, "Latency batch").set_value(
        64
    )  # 8x8 digits at batch 2 time mostly overhead: a loaded CPU resolves no cost
    widget(at.button, "Run analysis").click().run()
    until_stored(at, fresh)
    assert not at.error and any("resolved above the timing noise" in s.value for s in at.success)
    config = AnalysisResult.load(fresh.analyses()[0]["path"]).config
    assert (config.normalize, config.latency_batch) == ("latency", 64)


def until_stored(at: AppTest, store: Store, timeout: float = 120) -> None:
    """Rerun the page until the analysis thread has stored its result."""
    deadline = time.time() + timeout
    while not store.analyses() and time.time() < deadline:
        time.sleep(0.3)
    time.sleep(0.3)
    at.run()


def test_an_analysis_survives_a_visit_to_another_page(fresh):
    at = open_page("analyse")
    widget(at.number_input, "Samples N'").set_value(200)
    widget(at.text_input, "Name (optional)").set_value("kept")
    widget(at.button, "Run analysis").click().run()
    at.switch_page("../pages/ratios.py").run()
    assert not at.exception
    at.switch_page("../pages/analyse.py")
    until_stored(at, fresh)
    assert [r["name"] for r in fresh.analyses()] == ["kept"]
    assert any("Stored as **kept**" in s.value for s in at.success)
    # the form shows what was submitted, not its defaults
    assert widget(at.number_input, "Samples N'").value == 200
    assert widget(at.text_input, "Name (optional)").value == "kept"


def test_the_ratio_slider_changes_what_the_page_shows(stored):
    at = open_page("ratios")
    before = widget(at.metric, "Structures pruned").value
    widget(at.slider, "Global pruning ratio (structures)").set_value(0.8).run()
    after = widget(at.metric, "Structures pruned").value
    assert before != after and after.startswith(str(int(0.8 * 352 + 0.999)))


def test_an_impossible_ratio_shows_an_error(stored):
    at = open_page("ratios")
    widget(at.radio, "Unit").set_value("params").run()
    widget(at.slider, "Global pruning ratio (params)").set_value(0.99).run()
    assert at.error and "impossible" in at.error[0].value


def test_comparing_two_analyses_shows_overlap_and_correlation(stored):
    at = open_page("compare")
    jaccard = float(widget(at.metric, "Mask overlap (Jaccard)").value)
    assert 0 < jaccard < 1
    assert -1 <= float(widget(at.metric, "Rank correlation of saliencies").value) <= 1


def test_bottleneck_rule_changes_the_flags(stored):
    at = open_page("bottlenecks")
    widget(at.radio, "Rule").set_value("least").run()
    widget(at.number_input, "n").set_value(4).run()
    assert any("4 bottleneck layers" in t.value for t in at.text) and not at.error


def test_launching_and_cancelling_a_tiny_job(fresh):
    at = open_page("model")
    widget(at.number_input, "Epochs").set_value(50)
    widget(at.button, "Start training job").click().run()
    assert any("started" in s.value for s in at.success)
    [job] = fresh.jobs()
    runs = open_page("runs")
    widget(runs.button, "Cancel").click().run()
    deadline = time.time() + 120
    while fresh.job(job["id"])["status"] not in ("cancelled", "failed", "done") and time.time() < deadline:
        time.sleep(0.5)
    assert fresh.job(job["id"])["status"] == "cancelled"


def test_the_ratios_page_states_exactness_and_offers_the_mask_and_pruned_model(stored):
    at = open_page("ratios")
    assert any("exact" in c.value for c in at.caption)
    widget(at.button, "Prepare the pruned model").click().run()
    assert not at.exception and not at.error


def test_the_pruned_model_is_offered_with_its_own_measured_exactness(stored):
    at = open_page("ratios")
    widget(at.button, "Prepare the pruned model").click().run()
    lines = [shown(c.value) for c in at.caption] + [shown(w.value) for w in at.warning]
    assert any(line.startswith(("exact:", "approximate")) and "2 masks" in line for line in lines)
    assert any("ONNX Runtime's output deviates from PyTorch's" in line for line in lines)
    assert any(b.label == "Pruned model (.onnx)" for b in at.get("download_button"))


def pruned_checkpoint_loaded(tmp_path) -> AppTest:
    """The Model page after loading a pruned ResNet-20 checkpoint."""
    from sosp_engine.pruning.masks import pruned_copy
    from sosp_engine.pruning.pruned_models import pruning_recipe, save_pruned
    from conftest import random_mask

    wb = open_workbench(ModelSetup("resnet20", "digits"))
    mask = random_mask(wb.structures, 0.5)
    path = save_pruned(
        tmp_path / "small.pt",
        pruned_copy(wb.model, wb.structures, mask, wb.example),
        pruning_recipe("resnet20", wb.structures, mask, "cifar-resnet", []),
    )
    at = open_page("model")
    widget(at.selectbox, "Weights").set_value("checkpoint path")
    widget(at.text_input, "Checkpoint path (for 'checkpoint path')").set_value(str(path))
    widget(at.button, "Load model").click().run()
    return at


def test_a_pruned_checkpoint_reopens_on_the_model_page(fresh, tmp_path):
    at = pruned_checkpoint_loaded(tmp_path)
    assert not at.exception and not at.error
    assert any("pruned checkpoint of resnet20" in c.value for c in at.caption)


def test_a_study_after_loading_a_pruned_checkpoint_does_not_inherit_it(fresh, tmp_path):
    at = pruned_checkpoint_loaded(tmp_path)
    at.switch_page("../pages/studies.py").run()
    assert widget(at.text_input, "Trained weights (empty: train one net per seed)").value == ""
    assert any("are a pruned checkpoint" in shown(c.value) for c in at.caption)


def sensitivity_of(store: Store, name: str, **numbers: int) -> AppTest:
    """The Pruning ratios page after computing the sensitivity curve of the stored analysis `name`."""
    at = open_page("ratios")
    record_id = next(r["id"] for r in store.analyses() if r["name"] == name)
    widget(at.selectbox, "Analysis").set_value(record_id).run()
    for label, value in numbers.items():
        widget(at.number_input, label).set_value(value)
    widget(at.button, "Compute the curves").click().run()
    return at


def test_the_sensitivity_curves_of_an_analysis_are_computed_and_charted(stored):
    at = sensitivity_of(stored, "at init", Points=3, Samples=40)
    assert not at.exception and not at.error
    charts = at.get("plotly_chart")
    assert len(charts) >= 5  # histogram, width profile, accuracy, loss, predicted vs measured
    assert any("Unpruned\\: accuracy" in c.value for c in at.caption)


def test_the_along_order_correlation_is_shown_in_the_chart_title_and_the_caption(stored):
    at = sensitivity_of(stored, "at init", Points=3, Samples=40)
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("Predicted vs measured loss increase along the order (Spearman" in t for t in titles)
    assert any("Along one order\\: Spearman" in c.value for c in at.caption)


def test_the_trust_check_shows_its_verdict_scores_and_calibration(stored):
    at = sensitivity_of(stored, "at init", Points=3, Samples=40)
    widget(at.number_input, "Masks").set_value(8)
    widget(at.button, "Check the ranking").click().run()
    assert not at.exception and not at.error
    verdicts = [
        shown(m.value) for m in list(at.success) + list(at.warning) if "ranks masks of one size" in m.value
    ]
    assert verdicts and "Spearman" in verdicts[0] and "2x" in verdicts[0]
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("Calibration: predicted \\u002f measured" in t for t in titles)  # plotly escapes "/" in JSON
    assert any("Ranking of 8 masks of one size" in t for t in titles)


def test_a_sensitivity_curve_on_other_weights_shows_an_error(stored):
    at = sensitivity_of(stored, "after training", Points=3)
    assert not at.exception and at.error and "not the ones the analysis ran on" in at.error[0].value


def test_an_analysis_of_random_weights_is_not_labelled_trained(stored):
    at = open_page("ratios")
    trained = next(r["id"] for r in stored.analyses() if r["name"] == "after training")
    widget(at.selectbox, "Analysis").set_value(trained).run()
    assert any(shown(c.value) == "random weights (no checkpoint)" for c in at.caption)
    at_init = next(r["id"] for r in stored.analyses() if r["name"] == "at init")
    widget(at.selectbox, "Analysis").set_value(at_init).run()
    assert any(shown(c.value).startswith("at initialisation") for c in at.caption)


def test_a_tiny_study_launches_and_its_aggregate_is_charted(fresh):
    at = open_page("studies")
    widget(at.multiselect, "Methods").set_value(["magnitude"])
    widget(at.text_input, "Targets (ratios)").set_value("0.5")
    widget(at.text_input, "Seeds").set_value("0")
    widget(at.number_input, "Epochs").set_value(1)
    widget(at.number_input, "Fine-tuning epochs").set_value(0)
    widget(at.number_input, "Samples N'").set_value(20)
    widget(at.button, "Launch study").click().run()
    assert not at.error and any("Study queued (1 cells)" in s.value for s in at.success)
    [job] = fresh.jobs()
    deadline = time.time() + 300
    while fresh.job(job["id"])["status"] not in ("done", "failed") and time.time() < deadline:
        time.sleep(0.5)
    assert fresh.job(job["id"])["status"] == "done"
    at = open_page("studies")
    assert not at.exception and len(at.get("plotly_chart")) == 4


def test_a_study_with_unreadable_targets_shows_an_error(fresh):
    at = open_page("studies")
    widget(at.text_input, "Targets (ratios)").set_value("half")
    widget(at.button, "Launch study").click().run()
    assert at.error and "comma-separated numbers" in at.error[0].value and not fresh.jobs()


def test_a_failed_load_keeps_the_last_valid_model_and_the_next_load_works_at_once(fresh):
    at = open_page("model")
    widget(at.text_input, "Model spec").set_value("resnet57")
    widget(at.button, "Load model").click().run()
    assert any("unknown model" in e.value for e in at.error)
    assert at.session_state["model_choice"].model_spec == "resnet20"  # the last valid model stays current
    assert widget(at.metric, "Parameters").value == "272,186"
    widget(at.text_input, "Model spec").set_value("resnet32")
    widget(at.selectbox, "Weights").set_value("random init")
    widget(at.button, "Load model").click().run()
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["model_choice"].model_spec == "resnet32"


def test_the_demo_starts_on_the_trained_checkpoint(fresh):
    at = open_page("model")
    widget(at.button, "Test accuracy").click().run()
    assert float(widget(at.metric, "Test accuracy").value.rstrip("%")) > 95


def test_the_expand_page_widens_what_the_bottlenecks_page_flagged(stored):
    at = open_page("bottlenecks")
    widget(at.radio, "Rule").set_value("least").run()
    widget(at.number_input, "n").set_value(2).run()
    flagged = at.session_state["bottleneck_choice"]["units"]
    assert len(flagged) == 2
    at.switch_page("../pages/expand.py").run()
    assert not at.exception and not at.error
    assert any("2 layers flagged on the Bottlenecks page" in m.value for m in at.markdown)


def test_the_expand_page_launches_one_expand_study_of_the_flagged_bottlenecks(
    stored_root, tmp_path, monkeypatch
):
    import shutil

    import app.sidebar
    import sosp_engine.runs.jobs

    shutil.copytree(stored_root, tmp_path / "ws")
    monkeypatch.setenv("SOSP_WORKSPACE", str(tmp_path / "ws"))
    for module in (sosp_engine.runs.jobs, app.sidebar):  # queued, never run: the test checks what was queued
        monkeypatch.setattr(module, "launch_pending", lambda store: [])
    at = open_page("bottlenecks")
    widget(at.radio, "Rule").set_value("least").run()
    widget(at.number_input, "n").set_value(2).run()
    flagged = at.session_state["bottleneck_choice"]["units"]
    at.switch_page("../pages/expand.py").run()
    widget(
        at.toggle, "Find the bottlenecks on the study's own trained plain net (as the paper does)"
    ).set_value(False)
    widget(at.button, "Launch the expand study").click().run()
    assert (
        not at.exception
        and not at.error
        and any("Queued an expand study of 9 runs" in s.value for s in at.success)
    )
    [job] = Store(tmp_path / "ws").jobs()
    assert job["status"] == "queued"
    target = int(widget(at.metric, "Pruning target (params)").value.replace(",", ""))
    assert job["kind"] == "expand-study" and job["config"]["trials"] == 3
    assert (
        job["config"]["widen"] == {unit: 2.0 for unit in flagged} and job["config"]["target_params"] == target
    )


def test_the_studies_page_charts_a_finished_expand_study_against_the_unpruned_net(fresh):
    from sosp_engine.experiments.expand_study import ExpandStudy, ExpandStudyConfig
    from sosp_engine.runs.jobs import submit_expand_study
    from sosp_engine.runs.store import run_folder

    config = config_from_dict(
        ExpandStudyConfig,
        dict(
            model_spec="resnet20:widths=4,8,16",
            procedures=["train-prune", "widen-prune"],
            trials=1,
            epochs=1,
            finetune_epochs=1,
            samples=40,
            batch_size=256,
            device="cpu",
        ),
    )
    job_id = submit_expand_study(fresh, config, "tiny expand", start=False)
    ExpandStudy(config, run_folder(fresh.job(job_id))).run()
    fresh.update_job(job_id, status="done", progress=1.0)
    at = open_page("studies")
    assert not at.exception and not at.error
    assert widget(at.selectbox, "Study").options[0].startswith("expand study: tiny expand")
    charts = at.get("plotly_chart")
    assert len(charts) == 2 and any("unpruned plain net" in c.proto.spec for c in charts)


def test_reports_read_as_words_and_formatted_numbers():
    from app.report import analysis_report

    page = analysis_report(
        "t", {"param_ratio": 0.6164772510528564, "params_after": 106666, "at_init": False}, [], {}
    )
    assert "param ratio" in page and "61.6%" in page and "106,666" in page and ">no<" in page
    assert "0.6164772510528564" not in page


def test_exported_files_are_named_after_the_analysis_not_its_id():
    from app.export import file_slug

    assert (
        file_slug("pruning-ratios SOSP-H after training 50% of params")
        == "pruning-ratios-SOSP-H-after-training-50pct-of-params"
    )
    assert file_slug("../../etc/passwd") == "etc-passwd" and file_slug("***") == "export"


def test_the_attribution_scatter_stays_when_its_downloads_rerun_the_page(stored):
    at = open_page("bottlenecks")
    widget(at.button, "Compare with a first-order attribution (captum)").click().run()
    charts_before = len(at.get("plotly_chart"))
    at.run()  # a download click reruns the script like this
    assert not at.exception and not at.error and len(at.get("plotly_chart")) == charts_before == 2


def test_an_unforeseen_error_is_one_line_and_logged_not_a_traceback(fresh, monkeypatch):
    import sosp_engine.pruning.masks

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(sosp_engine.pruning.masks, "mask_summary", broken)
    at = AppTest.from_file(str(ROOT / "app" / "dashboard.py"), default_timeout=120)
    at.run()
    assert not at.exception
    assert at.error and "failed unexpectedly: KeyError" in at.error[0].value
    assert "boom" in (fresh.root / "logs" / "ui-errors.log").read_text()


def test_the_sidebar_shows_a_newly_loaded_model_in_the_same_run(fresh):
    at = open_page("model")
    weights = lambda: next(m.value for m in at.sidebar.markdown if "**Weights**" in m.value)  # noqa: E731
    assert "random init" not in weights()  # the demo starts on its trained checkpoint
    widget(at.selectbox, "Weights").set_value("random init")
    widget(at.button, "Load model").click().run()
    assert "random init" in weights()


def test_a_reload_keeps_the_chosen_model(fresh):
    at = open_page("model")
    widget(at.selectbox, "Weights").set_value("random init")
    widget(at.button, "Load model").click().run()
    assert at.query_params["weights"] == "" and at.query_params["model"] == "resnet20"
    reloaded = AppTest.from_file(str(ROOT / "app" / "dashboard.py"), default_timeout=120)
    reloaded.query_params.update(dict(at.query_params))
    reloaded.run()
    assert not reloaded.exception
    assert "random init" in next(m.value for m in reloaded.sidebar.markdown if "**Weights**" in m.value)


def test_several_analyses_share_one_profile_chart(stored):
    at = open_page("compare")
    assert not at.exception and not at.error
    assert len(widget(at.multiselect, "Analyses of this model (any number)").value) == 2
    assert len(at.get("plotly_chart")) == 4  # side by side, overlay, difference, all analyses


def test_runs_page_names_an_unreachable_ray_cluster_and_keeps_jobs_local(fresh):
    at = open_page("runs")
    assert "this machine" in at.expander[0].label
    widget(at.radio, "Backend").set_value("ray").run()
    widget(at.text_input, "Cluster address (HOST:PORT, or auto for a cluster started here)").set_value(
        "127.0.0.1:9"
    ).run()
    widget(at.button, "Connect").click().run()
    assert not at.exception
    assert any("cannot reach the Ray cluster at '127.0.0.1:9'" in shown(e.value) for e in at.error)
    assert (
        at.session_state["placement"].backend == "local"
    )  # nothing goes to a cluster that was never reached


@pytest.fixture
def stored_copy(stored_root, monkeypatch, tmp_path):
    """The stored workspace copied, for a test that writes into its analyses' folders (a latency profile)."""
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(stored_root, root)
    monkeypatch.setenv("SOSP_WORKSPACE", str(root))
    return Store(root)


def test_a_latency_target_is_measured_on_this_machine_and_sliced_into_a_mask(stored_copy):
    at = open_page("ratios")
    record_id = next(r["id"] for r in stored_copy.analyses() if r["name"] == "after training")
    widget(at.selectbox, "Analysis").set_value(record_id).run()
    widget(at.number_input, "Timed points").set_value(3)
    widget(at.slider, "Latency drop").set_value(0.05)  # reached on any machine: the test is not a timing
    widget(at.button, "Measure the latency profile").click().run()
    assert not at.exception
    refused = [shown(e.value) for e in at.error]
    if refused:  # a loaded machine: the target is refused with what to change, never sliced from noise
        assert all("cannot be resolved" in e and "batch" in e for e in refused)
        return
    # resolved or within the noise: a loaded machine decides which
    said = [m.value for m in [*at.success, *at.warning]]
    assert any("it measured" in m and ("faster" in m or "slower" in m or "no difference" in m) for m in said)
    assert any(b.label == "Mask at this latency (JSON)" for b in at.get("download_button"))
    widget(at.button, "Prune at this latency").click().run()
    assert any(b.label == "Pruned model at this latency (.pt)" for b in at.get("download_button"))


def test_the_bottlenecks_page_lists_the_chosen_layers_channels_with_their_saliency_parts(stored):
    at = open_page("bottlenecks")
    frame = at.dataframe[-1].value
    assert {"status", "sosp_saliency", "first_order_part", "second_order_part", "sosp_rank"} <= set(
        frame.columns
    )
    assert set(frame.status) <= {"pruned", "kept"} and len(frame) > 1


def test_the_ratios_page_measures_what_the_masks_buy_per_runtime(stored):
    at = open_page("ratios")
    widget(at.multiselect, "Batch sizes").set_value([1])
    widget(at.number_input, "Points per order").set_value(2)
    widget(at.button, "Measure what the masks buy").click().run()
    assert not at.exception and not at.error
    summary = at.dataframe[-1].value
    assert set(summary["runtime"]) == {"eager", "onnxruntime"}
    assert set(summary["order"]) == {"as analysed", "rounded to 8"}
    assert any("latency drop against MAC drop" in c.proto.spec for c in at.get("plotly_chart"))


def test_the_unit_and_ratio_survive_a_visit_to_another_page(stored):
    at = open_page("ratios")
    widget(at.radio, "Unit").set_value("params").run()
    widget(at.slider, "Global pruning ratio (params)").set_value(0.3).run()
    at.switch_page("../pages/bottlenecks.py").run()
    at.switch_page("../pages/ratios.py").run()
    assert not at.exception
    assert widget(at.radio, "Unit").value == "params"
    assert widget(at.slider, "Global pruning ratio (params)").value == pytest.approx(0.3)


def test_a_starting_job_reads_starting_in_the_sidebar_the_table_and_the_selector(fresh):
    job = fresh.add_job("train", "warming up", {"model_spec": "resnet20"})
    fresh.update_job(job, status="starting", heartbeat=time.time())
    at = open_page("runs")
    assert not at.exception
    assert any("1 starting" in m.value for m in at.sidebar.markdown)
    assert at.dataframe[0].value.set_index("id").loc[job, "status"] == "starting"
    assert widget(at.selectbox, "Job").format_func(job) == "warming up (starting)"


def test_a_shown_table_claims_no_spread_from_one_trial_and_shows_no_literal_none():
    from app.tables import column_config, shown_frame

    frame = pd.DataFrame(
        {
            "method": ["a", "b"],
            "seeds": [1, 3],
            "acc_pruned_mean": [0.5, 0.6],
            "acc_pruned_std": [0.0, 0.1],
            "node": [None, "n1"],
        }
    )
    shown = shown_frame(frame)
    assert shown.acc_pruned_std.tolist() == ["n/a (one trial)", "10.0%"]
    assert shown.node.tolist() == ["", "n1"]
    config = column_config(frame)
    assert config["acc_pruned_mean"]["label"] == "accuracy pruned (mean)"
    assert config["acc_pruned_mean"]["type_config"]["format"] == "percent"


def test_a_training_chart_names_its_stages_plainly_and_spans_accuracy_from_zero():
    from app.charts import training_curves

    metrics = pd.DataFrame({"stage": ["train-seed0", "cell"], "epoch": [1, 1], "val_acc": [0.5, None]})
    fig = training_curves(metrics, "study")
    assert [a.text for a in fig.layout.annotations] == [
        "train-seed0"
    ]  # no empty panel for a stage without it
    assert tuple(fig.layout.yaxis.range) == (0, 1.02)


def test_the_bottleneck_threshold_and_markers_sit_clear_of_the_bars():
    from app.charts import ratio_histogram
    from sosp_engine.pruning.masks import layer_table

    wb = open_workbench(ModelSetup("resnet20", "synthetic:3,8,8:10"))
    table = layer_table(wb.structures)
    fig = ratio_histogram(table, "t", threshold=0.2, flagged=[table.layer[0]])
    assert not fig.layout.annotations and not fig.layout.shapes  # the threshold is a legend entry
    marker = next(t for t in fig.data if t.name == "bottleneck")
    assert min(marker.y) > 1.1 > 1.0 + 0.05  # above a 100 % bar's label


# --- every click does what the form shows; every confirmation confirms one action -----------------------------------
def test_every_load_loads_what_the_form_shows_on_the_first_click(fresh):
    from app.state import DEMO_WEIGHTS

    at = open_page("model")
    for spec, weights in (
        ("resnet32", "random init"),
        ("resnet20", DEMO_WEIGHTS),
        ("vgg19x0.5", "random init"),
    ):
        widget(at.text_input, "Model spec").set_value(spec)
        widget(at.selectbox, "Weights").set_value(weights)
        widget(at.button, "Load model").click().run()
        assert not at.error, [e.value for e in at.error]
        choice = at.session_state["model_choice"]
        assert (choice.model_spec, choice.weights) == (spec, None if weights == "random init" else weights)
        assert widget(at.text_input, "Model spec").value == spec


def test_stored_weights_of_another_model_give_way_to_random_init_with_a_note(fresh):
    at = open_page("model")
    widget(at.text_input, "Model spec").set_value("resnet32")  # Weights still says "trained demo"
    widget(at.button, "Load model").click().run()
    assert not at.error and not at.exception
    choice = at.session_state["model_choice"]
    assert (choice.model_spec, choice.weights) == ("resnet32", None)
    assert any("random init" in shown(i.value) and "resnet20 on digits" in shown(i.value) for i in at.info)
    assert widget(at.selectbox, "Weights").value == "random init"


def two_failed_jobs(store: Store) -> list[str]:
    config = {"procedure": "train", "setup": {"model_spec": "resnet20"}}
    jobs = [store.add_job("train", name, config) for name in ("first", "second")]
    for job in jobs:
        store.update_job(job, status="failed", error="stopped")
    return jobs


def test_a_delete_confirmation_does_not_carry_over_to_the_next_job(fresh):
    first, second = two_failed_jobs(fresh)
    at = open_page("runs")
    job_picker = widget(at.selectbox, "Job")
    job_picker.set_value(first).run()
    widget(at.checkbox, "confirm delete").check().run()
    widget(at.button, "Delete job").click().run()
    assert [j["id"] for j in fresh.jobs()] == [second]
    assert widget(at.checkbox, "confirm delete").value is False
    assert widget(at.button, "Delete job").disabled


def test_a_delete_confirmation_resets_when_another_job_is_chosen(fresh):
    first, second = two_failed_jobs(fresh)
    at = open_page("runs")
    widget(at.selectbox, "Job").set_value(first).run()
    widget(at.checkbox, "confirm delete").check().run()
    widget(at.selectbox, "Job").set_value(second).run()
    assert widget(at.checkbox, "confirm delete").value is False and widget(at.button, "Delete job").disabled


def test_two_analyses_with_one_name_stay_two_series(stored_root, monkeypatch, tmp_path):
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(stored_root, root)
    monkeypatch.setenv("SOSP_WORKSPACE", str(root))
    store = Store(root)
    for record in store.analyses():
        store.rename_analysis(record["id"], "same name")
    at = open_page("compare")
    options = widget(at.multiselect, "Analyses of this model (any number)").options
    assert len(set(options)) == len(options) == len(store.analyses()) == 2


def test_the_html_report_names_files_and_data_without_local_folders():
    from app.report import analysis_report

    config = {
        "setup": {
            "weights": "/home/someone/ckpt/r20.pt",
            "data_spec": "cifar10:/data/c10",
            "model_spec": "/home/someone/nets.py:make",
        }
    }
    built = analysis_report("t", config, [], {})
    assert "/home/someone" not in built and "/data/" not in built
    assert all(name in built for name in ("r20.pt", "cifar10:c10", "nets.py:make"))


def test_the_model_form_shows_the_loaded_model_after_a_visit_to_another_page(fresh):
    at = open_page("model")
    widget(at.text_input, "Model spec").set_value("resnet32")
    widget(at.selectbox, "Weights").set_value("random init")
    widget(at.button, "Load model").click().run()
    at.switch_page("../pages/analyse.py").run()
    at.switch_page("../pages/model.py").run()
    assert widget(at.text_input, "Model spec").value == "resnet32"
    assert widget(at.selectbox, "Weights").value == "random init"


def test_training_in_the_background_says_it_starts_from_random_init_when_weights_are_loaded(fresh):
    at = open_page("model")
    said = [shown(c.value) for c in at.caption]
    assert any(
        "from a random initialisation: the loaded weights (resnet20-digits.pt) are not used" in c
        for c in said
    )


def test_large_counts_show_whole_in_the_model_pages_metric_tiles(fresh):
    at = open_page("model")
    params = next(m for m in at.metric if m.label == "Parameters")
    assert params.value == "272,186"


def test_a_deleted_job_is_said_deleted_with_the_analyses_made_on_its_weights(fresh):
    first, second = two_failed_jobs(fresh)
    result = run_analysis(
        open_workbench(ModelSetup("resnet20x0.25", "digits")), AnalysisConfig(method="magnitude", samples=4)
    )
    weights = fresh.artifacts / "jobs" / first / "run" / "trained.pt"
    result.config = AnalysisConfig.of(result.config.setup.with_weights(str(weights)), result.config)
    store_analysis(fresh, result, "first (analysis)")
    at = open_page("runs")
    widget(at.selectbox, "Job").set_value(first).run()
    widget(at.checkbox, "confirm delete").check().run()
    widget(at.button, "Delete job").click().run()
    said = " ".join(shown(s.value) for s in at.success)
    assert "Deleted job 'first'" in said and "'first (analysis)' stay listed" in said


def test_a_latency_target_gives_the_same_mask_on_the_ratios_page_as_in_the_cli(
    fresh, tmp_path, quiet_machine
):
    import json

    from sosp_engine.cli.main import main

    demo = str(ROOT / "assets" / "demo" / "resnet20-digits.pt")
    argv = ["analyze", "--model", "resnet20", "--weights", demo, "--method", "magnitude", "--samples", "8"]
    argv += ["--unit", "latency", "--ratio", "0.3", "--latency-points", "5", "--out", str(tmp_path / "a")]
    assert main(argv + ["--name", "cli", "--workspace", str(fresh.root)]) == 0
    pruned = len(json.loads((tmp_path / "a" / "mask.json").read_text())["pruned"])
    at = open_page("ratios")
    widget(at.selectbox, "Analysis").set_value(fresh.analyses()[0]["id"]).run()
    widget(at.number_input, "Timed points").set_value(5)
    widget(at.slider, "Latency drop").set_value(0.3)
    widget(at.button, "Measure the latency profile").click().run()
    assert not at.exception and not at.error
    said = " ".join(s.value for s in at.success)
    assert f"Pruned at {pruned} structures" in said and "faster (+- 0.2%)" in said


def test_the_ratios_page_measures_accuracy_for_its_design_review(stored):
    at = open_page("ratios")
    widget(at.button, "Measure accuracy for the report").click().run()
    assert not at.exception and not at.error
    assert any("before pruning" in c.value and "right after (in the report)" in c.value for c in at.caption)
    assert any(b.label == "Design review report (HTML)" for b in at.get("download_button"))


def test_the_pages_share_one_current_analysis_shown_in_the_sidebar(stored):
    at = open_page("bottlenecks")
    trained = next(r["id"] for r in stored.analyses() if r["name"] == "after training")
    assert widget(at.selectbox, "Analysis").value == trained  # not the newer one at initialisation
    at_init = next(r["id"] for r in stored.analyses() if r["name"] == "at init")
    widget(at.selectbox, "Analysis").set_value(at_init).run()
    at.switch_page("../pages/ratios.py").run()
    assert widget(at.selectbox, "Analysis").value == at_init
    assert any("**Analysis** at init" in m.value for m in at.sidebar.markdown)


def test_the_latency_settings_survive_a_visit_to_another_page(stored):
    at = open_page("ratios")
    widget(at.slider, "Latency drop").set_value(0.5).run()
    at.switch_page("../pages/model.py").run()
    at.switch_page("../pages/ratios.py").run()
    assert widget(at.slider, "Latency drop").value == 0.5


def test_weights_set_aside_for_another_model_come_back_with_a_note_when_they_fit_again(fresh):
    from app.state import DEMO_WEIGHTS

    at = open_page("model")
    widget(at.text_input, "Model spec").set_value("resnet32")  # the demo's weights do not fit: set aside
    widget(at.button, "Load model").click().run()
    widget(at.text_input, "Model spec").set_value("resnet20")
    widget(at.button, "Load model").click().run()
    assert not at.error and not at.exception
    assert at.session_state["model_choice"].weights == DEMO_WEIGHTS
    assert any("fit resnet20 on digits again" in shown(i.value) for i in at.info)


def test_a_stored_profile_is_timed_at_a_new_target_only_on_a_click(stored_copy, quiet_machine):
    at = open_page("ratios")
    widget(at.number_input, "Timed points").set_value(5)
    widget(at.button, "Measure the latency profile").click().run()
    assert any("faster" in s.value for s in at.success)
    widget(at.slider, "Latency drop").set_value(0.5).run()
    assert any("has not timed the mask at a 50% drop yet" in i.value for i in at.info)
    widget(at.button, "Time the mask at this target").click().run()
    assert not at.error and any("faster" in s.value for s in at.success)


def test_a_cancellation_is_said_on_that_visit_and_not_on_the_next(fresh):
    from app.background import CANCELLED, RunningAnalysis, _running

    at = AppTest.from_file(str(ROOT / "app" / "dashboard.py"), default_timeout=120)
    at.session_state["analysis_key"] = "cancelled-once"
    _running()["cancelled-once"] = RunningAnalysis(
        AnalysisConfig(), "x", finished=True, error=CANCELLED, shown=True
    )
    at.run()
    at.switch_page("../pages/analyse.py").run()
    assert any("The analysis was cancelled" in w.value for w in at.warning)
    at.switch_page("../pages/model.py").run()
    at.switch_page("../pages/analyse.py").run()
    assert not any("The analysis was cancelled" in w.value for w in at.warning)


def test_the_kernel_column_says_it_is_a_mean_over_the_groups_producers():
    from app.tables import HELP, _label

    assert _label("kernel") == "mean kernel side" and "7x7 stem" in HELP["kernel"]
