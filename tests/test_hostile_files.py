"""Hostile input, third round: special files are named, never opened (class 2); names are neutralised for the medium
that shows them; outputs never lose or lie (class 4); faults at the wrong moment leave the real cause (class 5)."""

import io
import json
import os
import subprocess
import time
from contextlib import contextmanager

import pandas as pd
import pytest
import torch
from torch import nn

from sosp_engine.atomic import NotAFileError, open_regular
from sosp_engine.cli.main import main
from sosp_engine.errors import CheckpointError
from sosp_engine.nets.checkpoints import read_checkpoint
from sosp_engine.nets.onnx_export import ExportError, checked_onnx
from sosp_engine.runs.jobs import mark_stale_jobs
from sosp_engine.runs.store import Store, StoreError
from sosp_engine.shown import safe_csv, terminal_text
from app.text import plain

pytestmark = pytest.mark.timeout(300)  # a special file that blocked would hang here: fail instead


def fifo(path):
    os.mkfifo(path)
    return path


# --- class 2: only regular files are opened -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, kind",
    [(fifo, "named pipe"), (lambda p: "/dev/zero", "character device"), (lambda p: p.mkdir() or p, "folder")],
)
def test_weights_that_are_no_regular_file_are_named_for_what_they_are(tmp_path, make, kind):
    path = make(tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=kind) as err:
        read_checkpoint(path)
    assert "does not exist" not in str(err.value)


@pytest.mark.parametrize("make", [fifo, lambda p: "/dev/null"])
def test_opening_a_special_file_never_waits(tmp_path, make):
    with pytest.raises(NotAFileError, match="not a file"):
        open_regular(make(tmp_path / "x"))


def test_an_image_folder_holding_a_fifo_is_refused_naming_it_without_blocking(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / "imgs" / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / split / label / "a.png")
            fifo(tmp_path / "imgs" / split / label / "0.png")
    code = main(["info", "--model", "resnet20x0.25", "--data", f"imagefolder:{tmp_path / 'imgs'}"])
    assert code == 2 and "0.png" in capsys.readouterr().err


def test_a_mask_that_is_a_fifo_is_refused(tmp_path, capsys):
    mask = fifo(tmp_path / "mask.json")
    code = main(["prune", "--model", "resnet20x0.25", "--mask", str(mask), "--save", str(tmp_path / "s.pt")])
    assert code == 2 and "named pipe" in capsys.readouterr().err and not (tmp_path / "s.pt").exists()


def test_a_pruned_checkpoint_with_thousands_of_steps_is_refused_at_once(tmp_path):
    from sosp_engine.pruning.pruned_models import PRUNED_FORMAT

    steps = [{"pruned": [], "architecture": "x"}] * 10_000
    torch.save(
        {"format": PRUNED_FORMAT, "model_spec": "resnet20", "steps": steps, "state_dict": {}},
        tmp_path / "p.pt",
    )
    started = time.perf_counter()
    assert main(["info", "--model", "resnet20", "--weights", str(tmp_path / "p.pt")]) == 2
    assert time.perf_counter() - started < 120  # one refusal, not 10,000 traces (minutes)


# --- names shown in a terminal, a page, a spreadsheet ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "evil\x1b]0;pwned\x07",
        "clear\x1b[2J\x1b[H",
        "row\nfake-id  done  100.0%",
        "demo\u202egnp.tp",
        "a\u200bb",
        "\x9b31m",
    ],
)
def test_a_name_shows_in_a_terminal_as_stored_never_as_a_command(name):
    shown = terminal_text(name)
    assert shown.isprintable() and "\\" in shown


def test_a_page_shows_a_bidi_override_as_an_escape():
    assert "\u202e" not in plain("weights\u202etp.omed") and "u202e" in plain("weights\u202etp.omed")


def test_jobs_list_prints_no_escape_sequence_of_a_job_name(tmp_path, capsys):
    store = Store(tmp_path / "ws")
    store.add_job("train", "title\x1b]0;pwned\x07\x1b[2J\nfake-row  done", {"procedure": "train"})
    assert main(["jobs", "list", "--workspace", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "cell", ['=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\t=1"]
)
def test_a_csv_cell_is_never_a_formula(cell):
    text = safe_csv(pd.DataFrame({"layer": [cell], "ratio": [0.5]}))
    assert pd.read_csv(io.StringIO(text), keep_default_na=False)["layer"][0] == "'" + cell


# --- class 4: outputs that never lose or lie -------------------------------------------------------------------------
def test_prune_refuses_one_path_for_the_checkpoint_and_the_onnx_file_before_any_work(tmp_path, capsys):
    out = tmp_path / "p.pt"
    code = main(
        ["prune", "--model", "resnet20", "--mask", "nothing.json", "--save", str(out), "--onnx", str(out)]
    )
    assert code == 2 and "both name" in capsys.readouterr().err and not out.exists()


class Branchy(nn.Module):
    """A forward that branches on tensor values: an export freezes the example's branch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x) if x.mean() > 0 else -self.linear(x)


def test_an_export_that_froze_a_data_dependent_branch_is_refused():
    torch.manual_seed(0)
    positive = torch.rand(8, 4) + 0.5
    with pytest.raises(ExportError, match="branches on tensor values"):
        checked_onnx(Branchy(), positive[:1], positive)


def test_two_uploads_of_one_name_keep_both_files(tmp_path):
    store = Store(tmp_path / "ws")
    first, second = store.save_upload("w.pt", b"first"), store.save_upload("w.pt", b"second")
    assert first != second and first.read_bytes() == b"first" and second.read_bytes() == b"second"
    assert store.save_upload("other.pt", b"first").parent == first.parent


def test_an_upload_name_cannot_leave_the_uploads_folder(tmp_path):
    store = Store(tmp_path / "ws")
    path = store.save_upload("../../\u202eevil.pt", b"x")
    assert path.is_relative_to(store.root / "uploads") and "\u202e" not in path.name


def test_deleting_a_training_job_removes_its_model_from_the_weights_list(tmp_path):
    store = Store(tmp_path / "ws")
    job = store.add_job("train", "t", {"procedure": "train"})
    store.update_job(job, status="done")
    store.add_model("t", "resnet20", "digits", store.artifacts / "jobs" / job / "run" / "final.pt", job, {})
    other = store.add_model("mine", "resnet20", "digits", tmp_path / "w.pt", None, {})
    store.delete("job", job, confirm=True)
    assert [m["id"] for m in store.models()] == [other]


# --- class 5: faults at the wrong moment ----------------------------------------------------------------------------
def test_a_job_that_could_not_record_its_error_gets_it_from_its_log(tmp_path):
    store = Store(tmp_path / "ws")
    job = store.add_job("train", "t", {"procedure": "train"})
    store.update_job(job, status="running", heartbeat=time.time() - 3600, pid=None)
    log = store.artifacts / "jobs" / job / "job.log"
    log.write_text("epoch 1\nTraceback ...\nfailed: DiskFullError: disk full (ENOSPC) while saving last.pt\n")
    assert mark_stale_jobs(store) == [job]
    assert store.job(job)["error"].startswith("DiskFullError: disk full (ENOSPC) while saving last.pt")


@contextmanager
def read_only_view(folder):
    """`folder` seen through a read-only bind mount (needs root and mount; skipped where neither is there)."""
    view = folder.parent / "read-only"
    view.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(folder), str(view)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("a read-only bind mount needs root")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=False, capture_output=True)


def test_a_read_only_workspace_opens_for_listing_and_viewing(tmp_path, capsys):
    store = Store(tmp_path / "ws")
    job = store.add_job("train", "kept", {"procedure": "train"})
    with read_only_view(tmp_path / "ws") as view:
        seen = Store(view)
        assert seen.read_only and [j["id"] for j in seen.jobs()] == [job]
        assert main(["jobs", "list", "--workspace", str(view)]) == 0 and "kept" in capsys.readouterr().out
        with pytest.raises(StoreError, match="read-only"):
            seen.update_job(job, name="x")
        assert sorted(p.name for p in view.iterdir()) == ["artifacts", "sosp.db"]
    assert json.loads(json.dumps(store.job(job)["name"])) == "kept"


def test_model_code_that_is_a_fifo_is_refused_without_importing(tmp_path, capsys):
    code = fifo(tmp_path / "model.py")
    assert main(["info", "--model", f"{code}:build"]) == 2
    assert "named pipe" in capsys.readouterr().err


def test_a_mask_nested_deeper_than_any_mask_is_refused(tmp_path, capsys):
    (tmp_path / "mask.json").write_text("[" * 100_000 + "]" * 100_000)
    code = main(
        [
            "prune",
            "--model",
            "resnet20x0.25",
            "--mask",
            str(tmp_path / "mask.json"),
            "--save",
            str(tmp_path / "s.pt"),
        ]
    )
    assert code == 2 and "nests deeper" in capsys.readouterr().err


def test_prune_never_writes_its_checkpoint_over_its_mask(tmp_path, capsys):
    mask = tmp_path / "mask.json"
    mask.write_text("{}")
    assert main(["prune", "--model", "resnet20", "--mask", str(mask), "--save", str(mask)]) == 2
    assert "both name" in capsys.readouterr().err and mask.read_text() == "{}"


@pytest.mark.parametrize("name", ["w\x1b]0;pwned\x07.pt", "w\u202etp.omed", "w\x9b2J.pt"])
def test_everything_the_cli_prints_escapes_control_and_bidi_characters(tmp_path, capsys, name):
    assert main(["info", "--model", "resnet20", "--weights", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    for text in (captured.out, captured.err):
        assert text.replace("\n", "").replace("\r", "").replace("\t", "").isprintable()


def test_a_text_file_renamed_pt_says_what_weights_are_accepted_without_internals(tmp_path, capsys):
    weights = tmp_path / "notes.pt"
    weights.write_text("these are my notes, not weights\n")
    assert main(["info", "--model", "resnet20", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert (
        "is not a file torch.load can read" in err
        and "{'state_dict': ...}" in err
        and "pruned checkpoint" in err
    )
    assert "IndexError" not in err and "Only plain state_dicts" not in err
