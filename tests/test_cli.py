import csv
import json

import torch

from conftest import random_mask
from sosp_engine.cli.main import main
from sosp_engine.nets.setup import ModelSetup
from sosp_engine.pruning.workbench import open_workbench
from sosp_engine.pruning.masks import pruned_copy, save_mask


def test_info_prints_a_model_summary(capsys):
    assert main(["info", "--model", "resnet20", "--data", "digits"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == 272_186 and result["layers"] == 10 and result["structures"] == 352
    assert len(result["layer_table"]) == 10


def test_info_warns_that_user_code_runs(capsys, user_model_spec):
    assert main(["info", "--model", user_model_spec, "--data", "synthetic:3,8,8:10"]) == 0
    assert "runs Python code" in capsys.readouterr().err


def test_prune_saves_a_smaller_model_with_matching_counts(tmp_path, capsys):
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    save_mask(tmp_path / "m.json", wb.structures, random_mask(wb.structures, 0.5))
    out = tmp_path / "result.json"
    assert (
        main(
            [
                "prune",
                "--model",
                "resnet20",
                "--mask",
                str(tmp_path / "m.json"),
                "--save",
                str(tmp_path / "small.pt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["params_after"] == result["params_counted"] < result["params_before"]
    assert result["macs_after"] == result["macs_counted"]
    state = torch.load(tmp_path / "small.pt", weights_only=True)["state_dict"]
    assert (
        sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
        == result["params_after"]
    )


def test_bad_input_is_an_error_line_not_a_traceback(capsys):
    assert main(["info", "--model", "resnet20", "--data", "cifar10:/no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert "error: data path '/no/such/folder' does not exist" in err and "Traceback" not in err


def test_a_pruned_checkpoint_reopens_with_the_usual_model_and_weights_flags(tmp_path, capsys):
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    torch.save(wb.model.state_dict(), tmp_path / "w.pt")
    mask = random_mask(wb.structures, 0.5, seed=3)
    save_mask(tmp_path / "m.json", wb.structures, mask)
    assert (
        main(
            [
                "prune",
                "--model",
                "resnet20",
                "--weights",
                str(tmp_path / "w.pt"),
                "--mask",
                str(tmp_path / "m.json"),
                "--save",
                str(tmp_path / "small.pt"),
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "info",
                "--model",
                "resnet20",
                "--weights",
                str(tmp_path / "small.pt"),
                "--out",
                str(tmp_path / "i.json"),
            ]
        )
        == 0
    )
    info = json.loads((tmp_path / "i.json").read_text())
    assert (
        info["pruned_checkpoint"]
        and info["params"] == json.loads((tmp_path / "p.json").read_text())["params_after"]
    )
    reopened = open_workbench(ModelSetup("resnet20", "digits", str(tmp_path / "small.pt")))
    expected = pruned_copy(wb.model, wb.structures, mask, wb.example).eval()
    x = wb.data.analysis_samples(8)[0]
    with torch.no_grad():
        assert torch.allclose(reopened.model.eval()(x), expected(x), atol=1e-6)


def test_a_pruned_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, capsys):
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    save_mask(tmp_path / "m.json", wb.structures, random_mask(wb.structures, 0.3))
    main(
        [
            "prune",
            "--model",
            "resnet20",
            "--mask",
            str(tmp_path / "m.json"),
            "--save",
            str(tmp_path / "small.pt"),
        ]
    )
    capsys.readouterr()
    assert main(["info", "--model", "resnet32", "--weights", str(tmp_path / "small.pt")]) == 2
    assert "made from 'resnet20'" in capsys.readouterr().err


def test_bottlenecks_read_the_mask_at_the_ratio_and_unit_analyze_wrote(tmp_path, capsys):
    out = tmp_path / "a"
    assert (
        main(
            [
                "analyze",
                "--model",
                "resnet20",
                "--method",
                "magnitude",
                "--samples",
                "20",
                "--ratio",
                "0.3",
                "--unit",
                "params",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert main(["bottlenecks", str(out), "--level", "stage"]) == 0
    captured = capsys.readouterr()
    assert "bottlenecks of the mask at 0.3 of params" in captured.err and "`" not in captured.out


def test_threads_are_set_from_the_option_and_checked(capsys, monkeypatch):
    import torch

    monkeypatch.setenv("SOSP_THREADS", "")  # restored (removed) after the test: main() exports its --threads
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "info", "--model", "resnet20"]) == 0 and torch.get_num_threads() == 1
        assert main(["--threads", "0", "info", "--model", "resnet20"]) == 2
        assert "at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_widen_prune_from_the_cli_matches_the_expansion_it_names(tmp_path, capsys):
    from sosp_engine.cli.main import build_parser, experiment_config

    args = build_parser().parse_args(
        ["jobs", "submit", "--procedure", "widen-prune", "--model", "resnet20", "--widen", "stage 3 (4x4)=2"]
    )
    config = experiment_config(args, "widen-prune")
    assert config.match_widen == {"stage 3 (4x4)": 2.0} and config.widen == {} and config.widen_factor is None


def test_analyze_keeps_the_minimum_width_and_prints_every_stage_of_the_call(tmp_path, capsys):
    args = ["analyze", "--model", "resnet20", "--data", "synthetic:3,8,8:10", "--method", "magnitude"]
    args += [
        "--samples",
        "8",
        "--min-channels",
        "6",
        "--ratio",
        "0.82",
        "--profile-stages",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    timings = next(line for line in err.splitlines() if "timings (s):" in line)
    assert all(f"{stage} " in timings for stage in ("data", "model", "structures", "saliency", "exactness"))
    config = json.loads((tmp_path / "analysis.json").read_text())["config"]
    assert config["min_channels"] == 6 and config["setup"]["model_spec"] == "resnet20"
    kept = [row["kept"] for row in csv.DictReader((tmp_path / "layers.csv").open())]
    assert min(int(k) for k in kept) == 6


def test_the_earlier_name_of_the_code_consent_flag_is_still_accepted():
    from sosp_engine.cli.main import build_parser

    for flag in ("--run-code", "--trust-code"):
        assert build_parser().parse_args(["bottlenecks", "some/analysis", flag]).run_code


def test_a_pruned_net_that_does_not_run_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from sosp_engine.pruning import workbench as workbench_module

    wb = open_workbench(ModelSetup("resnet20", "digits"))
    save_mask(tmp_path / "m.json", wb.structures, random_mask(wb.structures, 0.5))
    pruned_copy = workbench_module.pruned_copy

    def broken_copy(*args, **kwargs):  # as a module whose code fixes a width the surgery cut
        smaller = pruned_copy(*args, **kwargs)
        smaller.conv1.out_channels += 1
        smaller.conv1.weight = torch.nn.Parameter(
            smaller.conv1.weight[:1].repeat(smaller.conv1.out_channels, 1, 1, 1)
        )
        return smaller

    monkeypatch.setattr(workbench_module, "pruned_copy", broken_copy)
    args = ["--model", "resnet20", "--mask", str(tmp_path / "m.json"), "--save", str(tmp_path / "small.pt")]
    assert main(["prune", *args, "--onnx", str(tmp_path / "small.onnx")]) == 2
    assert "does not run" in capsys.readouterr().err
    assert main(["finetune", *args, "--epochs", "1"]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
