import json

import torch

from conftest import random_mask
from sosp_engine.cli import main
from sosp_engine.loading import open_workbench
from sosp_engine.masks import save_mask


def test_info_prints_a_model_summary(capsys):
    assert main(["info", "--model", "resnet20", "--data", "digits"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == 272_186 and result["layers"] == 10 and result["structures"] == 352
    assert len(result["layer_table"]) == 10


def test_info_warns_that_user_code_runs(capsys, user_model_spec):
    assert main(["info", "--model", user_model_spec, "--data", "synthetic:3,8,8:10"]) == 0
    assert "runs Python code" in capsys.readouterr().err


def test_prune_saves_a_smaller_model_with_matching_counts(tmp_path, capsys):
    wb = open_workbench("resnet20", "digits")
    save_mask(tmp_path / "m.json", wb.structures, random_mask(wb.structures, 0.5))
    out = tmp_path / "result.json"
    assert main(["prune", "--model", "resnet20", "--mask", str(tmp_path / "m.json"), "--save", str(tmp_path / "small.pt"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["params_after"] == result["params_counted"] < result["params_before"]
    assert result["macs_after"] == result["macs_counted"]
    state = torch.load(tmp_path / "small.pt", weights_only=True)
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == result["params_after"]


def test_bad_input_is_an_error_line_not_a_traceback(capsys):
    assert main(["info", "--model", "resnet20", "--data", "cifar10:/no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert "error: data path '/no/such/folder' does not exist" in err and "Traceback" not in err
