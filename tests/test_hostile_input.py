"""Bad, careless and hostile input: nothing runs from data, every foreseeable failure is one line, jobs lose nothing."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from sosp_engine.cli.main import main
from sosp_engine.nets.data import load_data
from sosp_engine.errors import DataSpecError, ModelSpecError
from sosp_engine.nets import build_model
from sosp_engine.runs.store import Store

SENTINEL = "sosp-pwned"


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_cifar(folder, marker):
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": Payload(marker), "labels": [0]}))


def test_a_crafted_cifar_folder_runs_no_code(tmp_path):
    marker = tmp_path / SENTINEL
    crafted_cifar(tmp_path / "cifar", marker)
    with pytest.raises(DataSpecError, match="refused to load"):
        load_data(f"cifar10:{tmp_path / 'cifar'}")
    assert not marker.exists()


def test_real_cifar_batches_still_load(tmp_path):
    folder = tmp_path / "cifar"
    folder.mkdir()
    gen = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": gen.integers(0, 255, (20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    bundle = load_data(f"cifar10:{folder}")
    assert bundle.num_classes == 10 and len(bundle.test) == 20


@pytest.mark.parametrize("spec", ["os:abort", "subprocess:run", "shutil:rmtree", "builtins:exit"])
def test_a_stdlib_callable_is_not_a_model_factory(spec):
    with pytest.raises(ModelSpecError, match="is not a model factory"):
        build_model(spec)


def test_a_factory_that_exits_does_not_end_the_process(tmp_path):
    source = tmp_path / "quits.py"
    source.write_text("import sys\ndef build():\n    sys.exit(3)\n")
    with pytest.raises(ModelSpecError, match="SystemExit"):
        build_model(f"{source}:build")


def test_a_stored_analysis_that_names_user_code_needs_trust(tmp_path, capsys):
    marker = tmp_path / SENTINEL
    evil = tmp_path / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef f():\n    pass\n")
    out = tmp_path / "a"
    assert (
        main(
            ["analyze", "--model", "resnet20", "--samples", "20", "--method", "magnitude", "--out", str(out)]
        )
        == 0
    )
    meta = json.loads((out / "analysis.json").read_text())
    meta["config"]["setup"]["model_spec"] = f"{evil}:f"
    (out / "analysis.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["bottlenecks", str(out)]) == 2
    assert "--run-code" in capsys.readouterr().err and not marker.exists()


def test_the_dashboard_refuses_foreign_host_names():
    config = (ROOT / ".streamlit" / "config.toml").read_text()
    assert 'allowedHosts = ["localhost", "127.0.0.1", "[::1]"]' in config
    assert "enableXsrfProtection = true" in config


def test_csv_exports_neutralise_formulas():
    import pandas as pd
    from sosp_engine.shown import safe_csv

    text = safe_csv(
        pd.DataFrame({"layer": ['=HYPERLINK("http://x")', "conv1", "+1", "@a"], "v": [1, 2, 3, 4]})
    )
    assert "'=HYPERLINK" in text and "\n'+1," in text and "\n'@a," in text and "\nconv1," in text


def test_names_are_shown_as_text_not_markdown():
    from app.text import plain

    assert plain("![x](http://evil/img.png)") == r"\!\[x\](http" + "\u2060" + r"\://evil/img.png)"


def nan_checkpoint(path):
    model = build_model("resnet20", 10, 1)
    state = model.state_dict()
    state["linear.weight"][0, 0] = float("nan")
    torch.save(state, path)
    return path


def int_checkpoint(path):
    state = {k: v.to(torch.int64) for k, v in build_model("resnet20", 10, 1).state_dict().items()}
    torch.save(state, path)
    return path


def empty_file(path):
    path.write_bytes(b"")
    return path


def json_file(path, payload):
    path.write_text(json.dumps(payload))
    return path


def cifar_folder(path, data, labels):
    path.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (path / name).write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=2))
    return path


def broken_image_folder(path):
    for split in ("train", "val"):
        for label in ("a", "b"):
            (path / split / label).mkdir(parents=True)
            (path / split / label / "x.png").write_bytes(b"not an image")
    return path


def page_corrupted_workspace(path):
    store = Store(path)
    for i in range(50):  # enough rows for several database pages
        store.add_job("train", f"job {i} " + "x" * 200, {})
    with store.connection() as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the rows into the database file itself
    size = store.db_path.stat().st_size
    with open(store.db_path, "r+b") as fh:  # every page but the first (the schema) overwritten
        fh.seek(4096)
        fh.write(os.urandom(size - 4096))
    return path


def truncated_analysis(path):
    from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis
    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench

    run_analysis(
        open_workbench(ModelSetup("resnet20", "digits")), AnalysisConfig(method="magnitude", samples=8)
    ).save(path)
    tensors = path / "tensors.pt"
    tensors.write_bytes(tensors.read_bytes()[:200])
    return path


BAD_INPUTS = {
    "empty weights file": lambda t: ["info", "--model", "resnet20", "--weights", str(empty_file(t / "e.pt"))],
    "empty weights path": lambda t: ["info", "--model", "resnet20", "--weights", ""],
    "nan weights": lambda t: ["info", "--model", "resnet20", "--weights", str(nan_checkpoint(t / "n.pt"))],
    "int weights": lambda t: ["info", "--model", "resnet20", "--weights", str(int_checkpoint(t / "i.pt"))],
    "cuda without gpu": lambda t: [
        "analyze",
        "--model",
        "resnet20",
        "--samples",
        "8",
        "--device",
        "cuda",
        "--out",
        str(t / "o"),
    ],
    "unknown device": lambda t: [
        "analyze",
        "--model",
        "resnet20",
        "--samples",
        "8",
        "--device",
        "foo",
        "--out",
        str(t / "o"),
    ],
    "huge seed": lambda t: [
        "analyze",
        "--model",
        "resnet20",
        "--samples",
        "8",
        "--seed",
        str(2**70),
        "--out",
        str(t / "o"),
    ],
    "zero width": lambda t: ["info", "--model", "resnet20x0"],
    "mask is a folder": lambda t: [
        "prune",
        "--model",
        "resnet20",
        "--mask",
        str(t),
        "--save",
        str(t / "s.pt"),
    ],
    "nan lr": lambda t: [
        "train",
        "--model",
        "resnet20",
        "--epochs",
        "1",
        "--lr",
        "nan",
        "--save",
        str(t / "w.pt"),
    ],
    "bottlenecks k nan": lambda t: ["bottlenecks", str(t / "none"), "-k", "nan"],
    "malformed analysis": lambda t: ["bottlenecks", str(t)],
    "os abort factory": lambda t: ["info", "--model", "os:abort"],
    "huge widths": lambda t: ["info", "--model", "resnet20:widths=100000,100000,100000"],
    "huge input shape": lambda t: ["info", "--model", "resnet20", "--data", "synthetic:3,100000,100000:10"],
    "cifar arrays of the wrong shape": lambda t: [
        "info",
        "--model",
        "resnet20",
        "--data",
        f"cifar10:{cifar_folder(t / 'c', np.zeros((10, 100), np.uint8), list(range(10)))}",
    ],
    "cifar labels out of range": lambda t: [
        "info",
        "--model",
        "resnet20",
        "--data",
        f"cifar10:{cifar_folder(t / 'c', np.zeros((10, 3072), np.uint8), [50] * 10)}",
    ],
    "corrupt images in an image folder": lambda t: [
        "analyze",
        "--model",
        "resnet20",
        "--data",
        f"imagefolder:{broken_image_folder(t / 'imgs')}",
        "--samples",
        "2",
        "--out",
        str(t / "o"),
    ],
    "out is a file": lambda t: [
        "analyze",
        "--model",
        "resnet20",
        "--samples",
        "8",
        "--out",
        str(empty_file(t / "f")),
    ],
    "mask keys of the wrong type": lambda t: [
        "prune",
        "--model",
        "resnet20",
        "--mask",
        str(json_file(t / "m.json", {"format": "sosp-mask/1", "pruned": [1, 2]})),
        "--save",
        str(t / "s.pt"),
    ],
    "truncated tensors": lambda t: ["bottlenecks", str(truncated_analysis(t / "a"))],
    "workspace is a file": lambda t: ["jobs", "list", "--workspace", str(empty_file(t / "ws"))],
    "page-corrupted database": lambda t: [
        "jobs",
        "list",
        "--workspace",
        str(page_corrupted_workspace(t / "ws")),
    ],
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_code_2(case, tmp_path, capsys):
    if case == "malformed analysis":
        (tmp_path / "analysis.json").write_text("{not json")
        (tmp_path / "tensors.pt").write_bytes(b"")
    if torch.cuda.is_available() and case == "cuda without gpu":
        pytest.skip("a GPU is visible")
    assert main(BAD_INPUTS[case](tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")


def test_an_epoch_redone_after_a_kill_is_recorded_once(tmp_path):
    store = Store(tmp_path)
    job = store.add_job("train", "t", {})
    store.add_metrics(job, "train", 1, {"val_acc": 0.1})
    store.add_metrics(job, "train", 2, {"val_acc": 0.2})
    store.add_metrics(job, "train", 2, {"val_acc": 0.25})  # the epoch ran again after its checkpoint was lost
    assert [(m["epoch"], m["data"]["val_acc"]) for m in store.metrics(job)] == [(1, 0.1), (2, 0.25)]


def test_resume_refuses_while_the_old_runner_is_alive(tmp_path):
    from sosp_engine.runs.jobs import resume
    from sosp_engine.runs.store import StoreError

    store = Store(tmp_path)
    job = store.add_job("train", "t", {})
    sleeper = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(30)  # run-job {job}"])
    try:
        store.update_job(job, status="failed", pid=sleeper.pid)
        with pytest.raises(StoreError, match="still has a live process"):
            resume(store, job, start=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    resume(store, job, start=False)
    assert store.job(job)["status"] == "queued"


def test_an_analysis_out_of_memory_halves_its_batch_and_gives_the_same_result(monkeypatch):
    import torch

    from sosp_engine.saliency import analysis
    from sosp_engine.saliency.analysis import AnalysisConfig, run_analysis
    from sosp_engine.nets.setup import ModelSetup
    from sosp_engine.pruning.workbench import open_workbench

    torch.manual_seed(0)
    wb = open_workbench(ModelSetup("resnet20", "digits"))
    reference = run_analysis(
        wb, AnalysisConfig(method="sosp-h", samples=32, batch_size=8, setup=ModelSetup(device="cpu"))
    )
    real = analysis.compute_saliency

    def tight(inputs, *args, **kwargs):
        if inputs.batch_size > 8:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
            )
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(analysis, "compute_saliency", tight)
    result = run_analysis(
        wb, AnalysisConfig(method="sosp-h", samples=32, batch_size=32, setup=ModelSetup(device="cpu"))
    )
    assert result.config.batch_size == 8
    torch.testing.assert_close(result.saliency, reference.saliency, rtol=1e-6, atol=1e-9)


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import errno

    import torch

    from sosp_engine import atomic
    from sosp_engine.atomic import DiskFullError, save_atomically

    path = save_atomically({"epoch": 1, "w": torch.ones(3)}, tmp_path / "last.pt")
    real = torch.save

    def half_written(obj, target):  # writes part of the file, then the disk is full
        target.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.torch, "save", half_written)
    with pytest.raises(DiskFullError, match="disk full"):
        save_atomically({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(atomic.torch, "save", real)
    assert torch.load(path, weights_only=True)["epoch"] == 1 and not list(tmp_path.glob("*.tmp"))
