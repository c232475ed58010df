"""The conformance matrix's checks on a few small real zoo models (the full matrix: `python bench/model_matrix.py`)."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from model_matrix import check_model  # noqa: E402


@pytest.mark.parametrize("spec", ["torchvision:mobilenet_v3_small", "timm:convnext_atto"])
def test_a_zoo_model_passes_every_conformance_check(spec):
    row = check_model(spec, side=32, samples=4)
    assert row["status"] == "ok" and row["structures"] > 0


def test_grouped_layers_are_found_in_regnet():
    assert check_model("torchvision:regnet_x_400mf", side=32, samples=4)["grouped_layers"] > 0


def test_sosp_i_says_when_its_matrix_cannot_fit(monkeypatch):
    import torch

    from sosp_engine.errors import AnalysisError
    from sosp_engine.saliency import sosp_i

    monkeypatch.setattr(sosp_i, "available_memory", lambda device: 2**30)
    with pytest.raises(
        AnalysisError, match=r"S = 100,000 structures: 37\.3 GiB in float32, but only 1\.0 GiB"
    ):
        sosp_i.matrix_dtype(100_000, torch.device("cpu"))


def test_a_model_whose_sosp_i_factor_cannot_fit_passes_the_other_checks_with_the_refusal(monkeypatch):
    from sosp_engine.saliency import curvature

    monkeypatch.setattr(curvature, "available_memory", lambda device: 2**20)
    row = check_model("torchvision:mobilenet_v3_small", side=32, samples=4)
    assert row["status"] == "ok" and "sosp-i_s" not in row and row["sosp-h_s"] > 0
    assert row["sosp_i_refused"].startswith(
        "SOSP-I needs its Gauss-Newton matrix over S = 4,872 structures as the R x S factor"
    )
