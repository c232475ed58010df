"""Pruned models exported to ONNX compute what PyTorch computes, in ONNX Runtime, at any batch size."""

import json

import pytest
import torch

from conftest import random_mask
from sosp_engine.cli.main import main
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.nets.onnx_export import TOLERANCE, ExportError, checked_onnx, onnx_deviation
from sosp_engine.pruning.masks import pruned_copy


@pytest.mark.parametrize(
    "spec,data",
    [
        ("resnet20", "digits"),
        ("torchvision:resnet18", "synthetic:3,32,32:4"),
        ("timm:mobilenetv3_small_050", "synthetic:3,32,32:4"),
    ],
)
def test_a_pruned_net_exported_to_onnx_equals_pytorch_in_onnx_runtime(spec, data):
    torch.manual_seed(0)
    wb = open_workbench(ModelSetup(spec, data))
    smaller = pruned_copy(wb.model, wb.structures, random_mask(wb.structures, 0.4), wb.example).eval()
    x, _ = wb.data.analysis_samples(8)
    exported, deviation = checked_onnx(smaller, wb.example, x)
    assert deviation <= TOLERANCE
    assert onnx_deviation(exported, smaller, x[:3]) <= TOLERANCE  # another batch size than the export's


def test_an_export_that_computes_something_else_is_refused():
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    x, _ = wb.data.analysis_samples(4)
    exported, _ = checked_onnx(wb.model, wb.example, x)
    other = open_workbench(ModelSetup("resnet20", "digits", None)).model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    assert onnx_deviation(exported, other, x) > TOLERANCE


def test_an_unexportable_model_is_a_clear_error():
    class Opaque(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real.sum((1, 2, 3)).unsqueeze(1)

    with pytest.raises(ExportError, match="cannot export"):
        checked_onnx(Opaque(), torch.randn(1, 1, 4, 4), torch.randn(2, 1, 4, 4))


def test_prune_writes_a_checked_onnx_file(tmp_path, capsys):
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    mask_file = tmp_path / "mask.json"
    from sosp_engine.pruning.masks import save_mask

    save_mask(mask_file, wb.structures, random_mask(wb.structures, 0.3))
    code = main(
        [
            "prune",
            "--model",
            "resnet20",
            "--mask",
            str(mask_file),
            "--save",
            str(tmp_path / "s.pt"),
            "--onnx",
            str(tmp_path / "s.onnx"),
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0 and (tmp_path / "s.onnx").stat().st_size > 1000
    assert json.loads((tmp_path / "r.json").read_text())["onnx_deviation"] <= TOLERANCE
