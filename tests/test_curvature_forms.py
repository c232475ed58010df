"""SOSP-I's Gauss-Newton matrix kept whole or as its R x S factor: the same saliencies and order, the form chosen by
size, and a refusal only where neither fits."""

import pytest
import torch

from sosp_engine.errors import AnalysisError
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.offered import find_structures
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.saliency import curvature
from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis
from sosp_engine.saliency.common import AnalysisInputs
from sosp_engine.saliency.curvature import FactorRows, MatrixRows, choose_form
from sosp_engine.saliency.selection import greedy_order, objective_prefix
from sosp_engine.saliency.sosp_i import gauss_newton_factor, gauss_newton_terms, sosp_i_matrix

MiB = 2**20


def analysis_inputs(spec: str, data: str, samples: int = 6, dtype=torch.float64) -> AnalysisInputs:
    torch.manual_seed(0)
    wb = open_workbench(ModelSetup(spec, data))
    model = wb.model.to(dtype).eval()
    x, y = wb.data.analysis_samples(samples, 0)
    return AnalysisInputs(model, wb.structures, x.to(dtype), y, "cross-entropy", 3)


def both_forms(inputs: AnalysisInputs, mc_labels: int = 0):
    first, gram = gauss_newton_terms(inputs, mc_labels=mc_labels, seed=1)
    matrix_diagonal = gram.diagonal().clone()
    matrix = MatrixRows(sosp_i_matrix(first, gram))
    factor_first, factor = gauss_newton_factor(inputs, mc_labels=mc_labels, seed=1)
    return (first, matrix_diagonal, matrix), (factor_first, FactorRows(factor_first, factor))


NETS = [
    ("resnet20", "digits"),  # CIFAR ResNet: residual streams coupling many layers
    ("vgg19", "digits"),
    ("densenet40", "digits"),  # concatenations
    ("timm:regnetx_002", "synthetic:3,32,32:10"),  # grouped convolutions
]


def assert_same_saliencies_and_order(inputs: AnalysisInputs) -> None:
    (first, matrix_diagonal, matrix), (factor_first, factor) = both_forms(inputs)
    assert torch.equal(first, factor_first)
    torch.testing.assert_close(factor.gram_diagonal, matrix_diagonal, rtol=1e-9, atol=0)
    fast, n_fast = greedy_order(matrix, inputs.structures)
    slow, n_slow = greedy_order(factor, inputs.structures)
    assert n_fast == n_slow and torch.equal(fast, slow)


@pytest.mark.parametrize("spec,data", NETS, ids=[spec for spec, _ in NETS])
def test_the_factor_form_gives_the_matrix_forms_saliencies_and_greedy_order(spec, data):
    assert_same_saliencies_and_order(analysis_inputs(spec, data))


def test_the_factor_form_gives_the_matrix_forms_saliencies_and_greedy_order_on_a_vit():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=10)
    vit = vit.double().eval()
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.arange(6) % 10
    assert_same_saliencies_and_order(
        AnalysisInputs(vit, find_structures(vit, x[:1]), x, y, "cross-entropy", 3)
    )


def test_the_factor_forms_rows_are_the_rows_of_q():
    inputs = analysis_inputs("resnet20", "digits", samples=4)
    (_, _, matrix), (_, factor) = both_forms(inputs)
    index = torch.tensor([5, 0, 17, 5])
    torch.testing.assert_close(factor.rows(index), matrix.q[index], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(factor.diagonal(), matrix.q.diagonal(), rtol=1e-10, atol=0)


def test_the_factor_form_agrees_with_sampled_labels():
    inputs = analysis_inputs("resnet20", "digits", samples=4)
    (_, matrix_diagonal, matrix), (_, factor) = both_forms(inputs, mc_labels=3)
    torch.testing.assert_close(factor.gram_diagonal, matrix_diagonal, rtol=1e-9, atol=0)
    assert torch.equal(greedy_order(matrix, inputs.structures)[0], greedy_order(factor, inputs.structures)[0])


def test_the_factor_forms_objective_of_each_prefix_is_the_matrix_forms():
    inputs = analysis_inputs("resnet20", "digits", samples=4)
    (_, _, matrix), (_, factor) = both_forms(inputs)
    order, n = greedy_order(matrix, inputs.structures)
    torch.testing.assert_close(
        objective_prefix(factor, order, n), objective_prefix(matrix, order, n), rtol=1e-9, atol=0
    )


def test_the_factor_form_forms_each_row_of_a_greedy_run_about_once():
    inputs = analysis_inputs("resnet20", "digits", samples=4)
    _, factor = both_forms(inputs)[1]
    factor.block = 32  # small blocks, so refills happen often
    formed = []
    original = factor.rows
    factor.rows = lambda index: formed.append(len(index)) or original(index)
    _, n = greedy_order(factor, inputs.structures)
    assert sum(formed) < 2 * n


def test_a_float32_net_gives_the_same_saliencies_in_either_form_to_1e_6_and_the_same_order():
    inputs = analysis_inputs("resnet20", "digits", dtype=torch.float32)
    (_, matrix_diagonal, matrix), (_, factor) = both_forms(inputs)
    torch.testing.assert_close(factor.gram_diagonal, matrix_diagonal, rtol=1e-6, atol=0)
    assert torch.equal(greedy_order(matrix, inputs.structures)[0], greedy_order(factor, inputs.structures)[0])


def test_the_matrix_is_chosen_wherever_it_fits_for_it_ranks_fastest():
    form = choose_form(10_000, samples=32, per_sample=16, device=torch.device("cpu"))
    assert form.name == "matrix" and form.dtype == torch.float64
    assert (
        "R = 512 rows (N' = 32 x 16) over S = 10,000 structures: the matrix fits the free memory"
        in form.reason
    )


def test_the_factor_is_chosen_where_the_matrix_does_not_fit(monkeypatch):
    monkeypatch.setattr(curvature, "available_memory", lambda device: 700 * MiB)
    form = choose_form(10_000, samples=32, per_sample=16, device=torch.device("cpu"))
    assert form.name == "factor" and form.bytes < 10_000 * 10_000 * 4
    assert (
        "the S x S matrix would take 381 MiB even in float32, more than the 304 MiB free" in form.describe()
    )


def test_the_matrix_is_kept_in_float32_where_only_that_fits(monkeypatch):
    monkeypatch.setattr(curvature, "available_memory", lambda device: 2 * 2**30)
    form = choose_form(15_000, samples=10_000, per_sample=9, device=torch.device("cpu"))
    assert form.name == "matrix" and form.dtype == torch.float32


def test_where_neither_form_fits_the_refusal_names_the_factor_the_free_memory_and_what_to_change(monkeypatch):
    monkeypatch.setattr(curvature, "available_memory", lambda device: 300 * MiB)
    with pytest.raises(AnalysisError) as refusal:
        choose_form(165_120, samples=32, per_sample=16, device=torch.device("cpu"))
    message = str(refusal.value)
    assert "R x S factor (R = 512 rows (N' = 32 x 16) over S = 165,120 structures)" in message
    assert "0.3 GiB is free" in message and "--samples" in message and "--mc-labels" in message
    assert "--exclude" in message and "SOSP-H" in message


def test_a_form_can_be_asked_for_and_an_unknown_one_is_refused():
    assert choose_form(100, 10, 9, torch.device("cpu"), forced="factor").name == "factor"
    assert choose_form(100, 1, 9, torch.device("cpu"), forced="matrix").name == "matrix"
    with pytest.raises(AnalysisError, match="unknown form 'diagonal'"):
        choose_form(100, 1, 9, torch.device("cpu"), forced="diagonal")


def test_an_analysis_states_which_form_ran_and_why_and_keeps_it_when_reopened(tmp_path):
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    result = run_analysis(wb, AnalysisConfig(method="sosp-i", samples=8, batch_size=4))
    assert result.curvature_form.startswith("Gauss-Newton matrix kept as the S x S matrix")
    assert "R = 72 rows (N' = 8 x 9) over S = " in result.curvature_form
    reopened = type(result).load(result.save(tmp_path / "analysis"))
    assert reopened.curvature_form == result.curvature_form


def test_a_stored_analysis_lists_the_form_for_the_dashboard(tmp_path):
    from sosp_engine.runs.records import store_analysis
    from sosp_engine.runs.store import Store

    wb = open_workbench(ModelSetup("resnet20", "digits"))
    result = run_analysis(wb, AnalysisConfig(method="sosp-i", samples=4, batch_size=4))
    store = Store(tmp_path / "ws")
    record = store.analysis(store_analysis(store, result, "sosp-i"))
    assert record["summary"]["curvature_form"] == result.curvature_form


def test_an_analysis_in_either_form_gives_the_same_order(monkeypatch):
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    config = AnalysisConfig(method="sosp-i", samples=8, batch_size=4)
    matrix = run_analysis(wb, config)
    chosen = curvature.choose_form
    monkeypatch.setattr(
        "sosp_engine.saliency.analysis.choose_form",
        lambda *args, **kwargs: chosen(*args, **kwargs, forced="factor"),
    )
    factor = run_analysis(wb, config)
    assert factor.curvature_form.startswith("Gauss-Newton matrix kept as its R x S factor")
    torch.testing.assert_close(factor.saliency, matrix.saliency, rtol=1e-6, atol=0)
    assert factor.n_prunable == matrix.n_prunable
