"""The latency target unit: a profile measured along the pruning order, and the shortest prefix that reaches a target."""

import json
from types import SimpleNamespace

import pytest

from sosp_engine.saliency.analysis import AnalysisConfig, AnalysisResult, run_analysis
from sosp_engine.cli.main import main
from sosp_engine.errors import AnalysisError
from sosp_engine.latency import profile as latency
from sosp_engine.pruning import masks
from sosp_engine.latency.profile import (
    REFINE_POINTS,
    LatencyComparison,
    LatencyProfile,
    LatencyTiming,
    Order,
    latency_mask,
    measure_profile,
    refine_at_targets,
    refine_profile,
    stored_profile,
)
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench


def profile(prefixes=(0, 10, 20), relative=(1.0, 0.8, 0.5)) -> LatencyProfile:
    return LatencyProfile("cpu", 1, 1, 0.01, list(prefixes), list(relative))


def test_a_latency_target_takes_the_shortest_prefix_the_profile_predicts_to_reach_it():
    curve = profile()
    k = curve.prefix_for(0.3, 20)  # 0.7 of the unpruned latency lies between the points at 10 and 20
    assert k == 14 and curve.predict(k) <= 0.7 < curve.predict(k - 1)


def test_a_rounded_order_stops_the_latency_target_at_a_rounding_stop():
    assert profile().prefix_for(0.3, 20, stops=[0, 8, 16, 20]) == 16


def test_a_latency_reduction_beyond_the_measured_one_is_a_clear_error():
    with pytest.raises(AnalysisError, match="at most 0.500 was measured"):
        profile().prefix_for(0.6, 20)


def test_the_profile_runs_from_the_unpruned_net_to_the_last_prunable_prefix_and_reloads(tmp_path):
    wb = open_workbench(ModelSetup("resnet20", "synthetic:3,8,8:10"))
    result = run_analysis(wb, AnalysisConfig(method="magnitude", samples=8))
    curve = measure_profile(wb, result.order(wb.structures), LatencyTiming(points=3, repeats=2))
    assert curve.prefixes[0] == 0 and curve.relative[0] == 1.0 and curve.prefixes[-1] == result.n_prunable
    assert len(curve.prefixes) == 3 and all(r > 0 for r in curve.relative) and curve.reference_seconds > 0
    assert LatencyProfile.load(curve.save(tmp_path / "latency.json")) == curve


def test_analyze_with_a_latency_target_writes_the_profile_and_the_mask_it_predicts(tmp_path, capsys):
    out = tmp_path / "a"
    # a small target at a batch where convolutions, not Python overhead, set the latency: a loaded machine still reaches it
    assert main(
        [
            "analyze",
            "--model",
            "resnet20",
            "--data",
            "synthetic:3,16,16:10",
            "--method",
            "magnitude",
            "--samples",
            "8",
            "--unit",
            "latency",
            "--ratio",
            "0.05",
            "--latency-batch",
            "16",
            "--latency-points",
            "4",
            "--out",
            str(out),
        ]
    ) in (0, 2)
    said = capsys.readouterr()
    if "cannot be resolved" in said.err:  # a loaded machine: refused with what to change, the profile kept
        assert "--latency-batch" in said.err and LatencyProfile.load(out / "latency.json").errors
        return
    assert "(target 5.0% faster, predicted" in said.out
    curve = LatencyProfile.load(out / "latency.json")
    mask = json.loads((out / "mask.json").read_text())
    assert len(mask["pruned"]) == curve.prefix_for(0.05, AnalysisResult.load(out).n_prunable)
    assert main(["bottlenecks", str(out)]) == 0  # reads the latency mask back through the stored profile


NO_NET = SimpleNamespace(
    model=None, structures=None, example=None
)  # stands for a workbench where timing is faked


def measured_at(monkeypatch, curve) -> list[int]:
    """Stand-ins for pruning and timing: the 'net' is its prefix length, its latency `curve(k)`; returns the timed ks."""
    timed = []
    monkeypatch.setattr(masks, "pruned_copy", lambda model, structures, mask, example: len(mask))
    monkeypatch.setattr(
        latency,
        "compare_latency",
        lambda net, ref, example, timing: timed.append(net) or LatencyComparison(0.0, curve(net), 0.0),
    )
    return timed


def test_a_target_between_measured_points_is_timed_until_the_mask_itself_was_measured(monkeypatch):
    # the line says 0.7 at 14; the real net there is slower than the line (a narrow kernel)
    timed = measured_at(monkeypatch, lambda k: 0.75 if k < 17 else 0.65)
    curve = profile()
    order = [f"s{i}" for i in range(20)]
    assert refine_profile(curve, NO_NET, Order(order, 20), 0.3)
    k = curve.prefix_for(0.3, 20)
    assert k in curve.prefixes and curve.relative[curve.prefixes.index(k)] <= 0.7 and k >= 17
    assert timed and len(timed) <= REFINE_POINTS and curve.prefixes == sorted(curve.prefixes)


def test_a_target_on_a_measured_point_needs_no_more_timing(monkeypatch):
    timed = measured_at(monkeypatch, lambda k: 0.5)
    curve = profile()
    assert not refine_profile(curve, NO_NET, Order([f"s{i}" for i in range(20)], 20), 0.5)
    assert timed == [] and curve.prefixes == [0, 10, 20]


def test_a_profile_refined_at_several_targets_measures_each_targets_own_mask(monkeypatch):
    measured_at(monkeypatch, lambda k: {14: 0.7, 5: 0.5}.get(k, 1 - k / 40))
    curve = profile()
    assert refine_at_targets(curve, NO_NET, Order([f"s{i}" for i in range(20)], 20), [0.3, 0.1])
    for target in (0.1, 0.3):
        assert curve.prefix_for(target, 20) in curve.prefixes


def test_a_profile_refined_at_a_target_is_only_sliced_there_afterwards(monkeypatch):
    timed = measured_at(monkeypatch, lambda k: 0.75 if k < 17 else 0.65)
    curve = profile()
    order = [f"s{i}" for i in range(20)]
    assert refine_at_targets(curve, NO_NET, Order(order, 20), [0.3])
    first = len(timed)
    assert not refine_at_targets(curve, NO_NET, Order(order, 20), [0.3])
    assert len(timed) == first and curve.refined_at == [0.3]


def test_a_target_the_profile_cannot_reach_is_left_to_its_mask_to_report(monkeypatch):
    timed = measured_at(monkeypatch, lambda k: 0.5)
    curve = profile()
    assert not refine_at_targets(curve, NO_NET, Order([f"s{i}" for i in range(20)], 20), [0.9])
    assert timed == []
    with pytest.raises(AnalysisError, match="not reached"):
        curve.prefix_for(0.9, 20)


def test_a_stored_profile_keeps_the_points_refined_for_a_target(monkeypatch, tmp_path):
    measured_at(monkeypatch, lambda k: 0.75 if k < 17 else 0.65)
    profile().save(tmp_path / "latency.json")

    class Result:  # the parts of an AnalysisResult the profile reads
        def order(self, structures):
            return Order([f"s{i}" for i in range(20)], 20)

    stored_profile(Result(), NO_NET, tmp_path, LatencyTiming(), [0.3])
    assert len(LatencyProfile.load(tmp_path / "latency.json").prefixes) > 3


def test_a_measured_change_says_faster_or_slower_beyond_its_spread_and_nothing_within_it():
    assert LatencyComparison(0.01, 0.7, 0.02).change() == "30.0% faster (+- 4.0%)"
    assert LatencyComparison(0.01, 1.6, 0.05).change() == "60.0% slower (+- 10.0%)"
    assert LatencyComparison(0.01, 0.97, 0.05).change().startswith("no difference resolved (-3.0% +- 10.0%")


def test_a_profile_that_rises_beyond_its_spread_is_flagged_as_noise():
    noisy = LatencyProfile(
        "cpu", 1, 1, 0.01, [0, 10, 20, 30], [1.0, 0.4, 1.9, 0.3], errors=[0.0, 0.05, 0.05, 0.05]
    )
    assert any("rises from 0.400 at 10 structures to 1.900 at 20" in note for note in noisy.noise())
    assert "--latency-batch" in noisy.noise_warning()


def test_a_profile_whose_spread_exceeds_its_steps_is_flagged_and_a_clean_one_is_not():
    blurred = LatencyProfile(
        "cpu", 1, 1, 0.01, [0, 10, 20, 30], [1.0, 0.95, 0.9, 0.85], errors=[0.0, 0.2, 0.2, 0.2]
    )
    clean = LatencyProfile(
        "cpu", 1, 1, 0.01, [0, 10, 20, 30], [1.0, 0.8, 0.6, 0.4], errors=[0.0, 0.01, 0.01, 0.01]
    )
    assert any("larger than the typical step" in note for note in blurred.noise())
    assert clean.noise() == [] and clean.noise_warning() is None


def test_a_profile_stored_before_spreads_were_kept_reads_and_flags_nothing(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(
        json.dumps(
            {
                "device": "cpu",
                "batch": 1,
                "threads": 1,
                "reference_seconds": 0.01,
                "prefixes": [0, 10],
                "relative": [1.0, 0.5],
            }
        )
    )
    old = LatencyProfile.load(path)
    assert old.errors == [] and old.noise() == []


def test_the_cli_says_slower_when_the_chosen_net_is_slower(monkeypatch, capsys):
    from types import SimpleNamespace

    from sosp_engine.cli import main as cli

    monkeypatch.setattr(cli, "compare_latency", lambda *a, **k: LatencyComparison(0.072, 1.607, 0.01))
    bench = SimpleNamespace(prune=lambda mask: SimpleNamespace(model=None), model=None, example=None)
    cli.print_latency(SimpleNamespace(ratio=0.5), bench, {"a"}, profile())
    out = capsys.readouterr().out
    assert (
        "60.7% slower (+- 2.0%)" in out and "faster (+-" not in out.split("measured")[1].split("(target")[0]
    )


def analyze_latency(out, ratio: float) -> list[str]:
    return [
        "analyze",
        "--model",
        "resnet20x0.5",
        "--data",
        "synthetic:3,8,8:10",
        "--method",
        "magnitude",
        "--samples",
        "8",
        "--unit",
        "latency",
        "--ratio",
        str(ratio),
        "--latency-points",
        "5",
        "--out",
        str(out),
    ]


def noisy_timer(monkeypatch, seed: int = 0) -> None:
    """A machine under heavy, bursty load: every inference takes 1 to 30 ms, whatever the net."""
    import random

    draw = random.Random(seed)
    monkeypatch.setattr(latency, "_forward_seconds", lambda forward, device: draw.uniform(0.001, 0.03))


def test_a_latency_target_on_a_noisy_machine_is_refused_with_what_to_change(tmp_path, monkeypatch, capsys):
    noisy_timer(monkeypatch)
    assert main(analyze_latency(tmp_path / "a", 0.1)) == 2
    err = capsys.readouterr().err
    assert "cannot be resolved" in err and "--latency-batch" in err and "quieter machine" in err
    assert not (tmp_path / "a" / "mask.json").exists()


def test_an_unresolvable_pick_is_refused_and_a_resolved_one_taken():
    blurred = LatencyProfile("cpu", 1, 1, 0.01, [0, 10, 20], [1.0, 0.75, 0.5], errors=[0.0, 0.05, 0.01])
    with pytest.raises(
        AnalysisError, match="at 10 structures measured 0.750 \\+- 0.100, within the timing spread"
    ):
        blurred.prefix_for(0.3, 20)
    sharp = LatencyProfile("cpu", 1, 1, 0.01, [0, 10, 20], [1.0, 0.75, 0.5], errors=[0.0, 0.01, 0.01])
    assert sharp.prefix_for(0.3, 20) == 12
    flat = LatencyProfile("cpu", 1, 1, 0.01, [0, 10, 20], [1.0, 0.99, 0.97], errors=[0.0, 0.01, 0.02])
    with pytest.raises(AnalysisError, match="no reduction beyond the timing spread"):
        flat.prefix_for(0.03, 20, stops=[0, 10, 20])


def test_a_target_beyond_a_rise_of_the_profile_beyond_its_spread_is_refused():
    risen = LatencyProfile(
        "cpu", 1, 1, 0.01, [0, 10, 20, 30], [1.0, 0.9, 1.4, 0.5], errors=[0.0, 0.01, 0.01, 0.01]
    )
    with pytest.raises(
        AnalysisError, match="rises from 0.900 at 10 structures to 1.400 at 20.*follows noise"
    ):
        risen.prefix_for(0.3, 30, stops=[0, 10, 20, 30])
    assert risen.prefix_for(0.05, 30, stops=[0, 10, 20, 30]) == 10  # the rise lies beyond this target's pick


def test_a_latency_target_gives_a_job_the_mask_analyze_wrote_without_timing_again(
    tmp_path, quiet_machine, monkeypatch
):
    out = tmp_path / "a"
    argv = ["analyze", "--model", "resnet20", "--method", "magnitude", "--samples", "8", "--unit", "latency"]
    assert (
        main(argv + ["--ratio", "0.3", "--latency-points", "5", "--latency-device", "cpu", "--out", str(out)])
        == 0
    )
    written = set(json.loads((out / "mask.json").read_text())["pruned"])
    result = AnalysisResult.load(out)
    wb = open_workbench(result.config.setup)

    def timed_again(*args, **kwargs):
        raise AssertionError("the stored profile was timed again")

    monkeypatch.setattr(latency, "compare_latency", timed_again)
    monkeypatch.setattr(latency, "measure_latency", timed_again)
    mask, profile = latency_mask(result, wb, out, 0.3, LatencyTiming.of(result.config, "cpu"))
    assert mask == written and profile.refined_at == [0.3]


def test_a_new_analysis_written_into_a_folder_drops_the_profile_timed_along_the_old_order(tmp_path):
    wb = open_workbench(ModelSetup("resnet20", "synthetic:3,8,8:10"))
    result = run_analysis(wb, AnalysisConfig(method="magnitude", samples=8))
    profile().save(tmp_path / "latency.json")
    result.save(tmp_path)
    assert not (tmp_path / "latency.json").exists()


def test_a_latency_target_gives_a_job_the_same_mask_as_analyze(tmp_path, quiet_machine):
    from conftest import ROOT
    from sosp_engine.experiments.procedures import Experiment, ExperimentConfig
    from sosp_engine.experiments.training import TrainConfig

    demo = str(ROOT / "assets" / "demo" / "resnet20-digits.pt")
    argv = ["analyze", "--model", "resnet20", "--weights", demo, "--method", "magnitude", "--samples", "8"]
    argv += ["--unit", "latency", "--ratio", "0.3", "--latency-device", "cpu", "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "cli")]) == 0
    job = ExperimentConfig(
        procedure="train-prune",
        setup=ModelSetup("resnet20", "digits", demo, device="cpu"),
        training=TrainConfig(epochs=0),
        analysis=AnalysisConfig(method="magnitude", samples=8).options(),
        finetune_epochs=0,
        ratio=0.3,
        unit="latency",
    )
    Experiment(job, tmp_path / "job").run()
    cli_mask = json.loads((tmp_path / "cli" / "mask.json").read_text())["pruned"]
    assert cli_mask and sorted(json.loads((tmp_path / "job" / "mask.json").read_text())["pruned"]) == sorted(
        cli_mask
    )
