"""The memory budget: peak tensor bytes followed exactly, a per-sample fit that predicts a real analysis, the batch it allows."""

import pytest
import torch

from sosp_engine.saliency.analysis import AnalysisConfig, AnalysisOptions, compute_saliency, run_analysis
from sosp_engine.cli.main import main
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.saliency.memory import (
    MATRIX,
    MemoryBudgetError,
    MemoryEstimate,
    PeakTensorBytes,
    default_budget,
    memory_phase,
    probe,
)
from sosp_engine.saliency.common import AnalysisInputs

CPU = torch.device("cpu")


def test_the_peak_counts_tensors_alive_together_not_those_freed_before():
    with PeakTensorBytes() as tracker:
        first = torch.zeros(1000)
        del first
        second, third = torch.zeros(2000), torch.zeros(500)
    assert tracker.peak["cpu"] == 4 * 2500 and second.numel() + third.numel() == 2500


def test_the_probe_fits_fixed_and_per_sample_bytes_of_a_known_workload():
    def workload(n: int) -> None:
        kept = torch.zeros(250_000)  # 1 MB whatever the batch
        per_sample = torch.zeros(n, 25_000)  # 100 kB a sample, alive at the same time
        assert kept.numel() and per_sample.numel()

    estimate = probe(workload, CPU, largest=100)
    assert estimate.fixed == 1_000_000 and estimate.per_sample == 100_000


def _known_workload(sizes: list[int]):
    def workload(n: int) -> None:
        sizes.append(n)
        kept = torch.zeros(250_000)  # 1 MB whatever the batch
        per_sample = torch.zeros(n, 25_000)  # 100 kB a sample, alive at the same time
        assert kept.numel() and per_sample.numel()

    return workload


def test_the_probe_does_not_run_a_size_its_estimate_puts_over_the_budget():
    sizes: list[int] = []
    estimate = probe(_known_workload(sizes), CPU, largest=100, budget=2_500_000)
    assert sizes == [1, 2, 4, 8]  # 16 samples would need 2.6 MB
    assert estimate.fixed == 1_000_000 and estimate.per_sample == 100_000
    assert estimate.batch_within(2_500_000, largest=100) == 15


def test_after_one_probe_the_whole_peak_counts_per_sample_so_the_estimate_is_an_upper_bound():
    sizes: list[int] = []
    estimate = probe(_known_workload(sizes), CPU, largest=100, budget=1_500_000)
    assert sizes == [1]  # two samples could need twice one sample's 1.1 MB
    assert estimate.peak(1) == 1_100_000 and estimate.peak(8) >= 1_000_000 + 8 * 100_000


def test_the_probe_never_runs_the_analysis_batch_itself():
    sizes: list[int] = []
    probe(_known_workload(sizes), CPU, largest=8)
    assert max(sizes) < 8


def test_a_larger_once_only_selection_phase_does_not_hide_the_per_sample_growth():
    def workload(n: int) -> None:
        per_sample = torch.zeros(n, 25_000)  # 100 kB a sample
        with memory_phase(MATRIX):
            matrix = torch.zeros(1_000_000)  # 4 MB once, more than 16 samples' batched work
        assert per_sample.numel() and matrix.numel()

    estimate = probe(workload, CPU, largest=100)
    assert estimate.per_sample == 100_000 and estimate.floor >= 4_000_000
    assert estimate.peak(100) == pytest.approx(10_000_000, rel=0.01) and estimate.peak(2) == estimate.floor


def test_the_batch_is_the_largest_whose_estimate_fits_the_budget():
    estimate = MemoryEstimate(fixed=100, per_sample=10)
    assert estimate.batch_within(205, largest=50) == 10
    assert estimate.batch_within(10_000, largest=50) == 50


def test_a_budget_below_one_sample_is_a_clear_error():
    with pytest.raises(MemoryBudgetError, match="even with one sample"):
        MemoryEstimate(fixed=100, per_sample=10).batch_within(105, largest=50)


@pytest.mark.parametrize("method", ["sosp-h", "sosp-i"])
def test_the_estimate_predicts_the_peak_of_the_analysis_at_a_larger_batch(method):
    wb = open_workbench(ModelSetup("resnet20", "synthetic:3,16,16:10"))
    model = wb.model.eval()
    x, y = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(48) % 10

    def run(n: int) -> None:
        compute_saliency(
            AnalysisInputs(model, wb.structures, x[:n], y[:n], "cross-entropy", n),
            AnalysisOptions(method=method),
            "none",
        )

    estimate = probe(run, CPU, largest=48)
    with PeakTensorBytes() as tracker:
        run(48)
    assert estimate.peak(48) == pytest.approx(tracker.peak["cpu"], rel=0.1)


def test_an_analysis_under_a_small_budget_takes_a_smaller_batch_and_says_so():
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    result = run_analysis(
        wb, AnalysisConfig(method="sosp-h", samples=64, batch_size=64, memory_budget_gb=0.02)
    )
    assert result.config.batch_size == result.memory["batch"] < 64
    assert result.memory["estimated_peak_bytes"] <= 0.02 * 2**30 and "MiB per sample" in result.memory["line"]


def test_a_small_batch_is_probed_too_so_a_budget_holds_for_it():
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    result = run_analysis(
        wb, AnalysisConfig(method="sosp-h", samples=16, batch_size=8, memory_budget_gb=0.0015)
    )
    assert 1 < result.config.batch_size < 8 and result.memory["estimated_peak_bytes"] <= 0.0015 * 2**30


def test_the_default_budget_leaves_the_cpu_heap_room_beyond_the_tensors(monkeypatch):
    monkeypatch.setattr("sosp_engine.saliency.memory.available_memory", lambda device: 10 * 2**30)
    assert default_budget(CPU) == 5 * 2**30


def test_the_cli_refuses_a_memory_budget_that_is_not_a_number(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["analyze", "--model", "resnet20", "--memory-budget", "lots", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert "--memory-budget: takes a number or auto or none, got 'lots'" in capsys.readouterr().err
