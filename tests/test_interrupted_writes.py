"""Every multi-step write is recoverable from every intermediate state, and a failed write leaves nothing behind and
names the file the user gave."""

import os
from pathlib import Path

import pytest
import torch

from sosp_engine.atomic import (
    WriteError,
    checksum_path,
    file_digest,
    finish_interrupted_save,
    load_with_fallback,
    previous_path,
    save_atomically,
    write_bytes_atomically,
    write_json_atomically,
)


def save_steps(path: Path, obj: object) -> list:
    """`save_atomically(obj, path, keep_previous=True)` as its separate steps, so a test can stop after any one."""
    tmp = path.with_name(path.name + ".tmp")
    return [
        lambda: torch.save(obj, tmp),
        lambda: checksum_path(tmp).write_text(file_digest(tmp) + "\n"),
        lambda: path.replace(previous_path(path)),
        lambda: checksum_path(path).replace(checksum_path(previous_path(path))),
        lambda: tmp.replace(path),
        lambda: checksum_path(tmp).replace(checksum_path(path)),
    ]


@pytest.mark.parametrize("done", range(7))
def test_a_checkpoint_killed_after_any_step_resumes_from_the_newest_whole_one(tmp_path, done):
    path = tmp_path / "last.pt"
    save_atomically({"epoch": 4}, path, keep_previous=True)
    save_atomically({"epoch": 5}, path, keep_previous=True)
    for step in save_steps(path, {"epoch": 6})[:done]:
        step()
    finish_interrupted_save(path)
    expected = 6 if done >= 2 else 5  # the new checkpoint is whole once its checksum is written
    assert load_with_fallback(path)["epoch"] == expected
    assert not any(p.name.endswith((".tmp", ".tmp.sha256")) for p in tmp_path.iterdir())
    assert load_with_fallback(previous_path(path))["epoch"] == expected - 1


def test_a_half_written_temporary_checkpoint_is_removed_and_the_older_one_kept(tmp_path):
    path = tmp_path / "last.pt"
    save_atomically({"epoch": 1}, path, keep_previous=True)
    path.with_name("last.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")
    finish_interrupted_save(path)
    assert load_with_fallback(path)["epoch"] == 1 and not path.with_name("last.pt.tmp").exists()


def test_a_training_killed_between_the_checkpoint_renames_goes_on_from_its_last_epoch(tmp_path):
    from sosp_engine.experiments.training import TrainResult, _resume

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": [],
        "config": {},
    }
    path = tmp_path / "last.pt"
    save_atomically({**state, "epoch": 3}, path, keep_previous=True)
    save_atomically({**state, "epoch": 4}, path, keep_previous=True)
    for step in save_steps(path, {**state, "epoch": 5})[:4]:  # last.pt.prev and last.pt.tmp, no last.pt
        step()
    assert not path.exists()
    assert _resume(path, "cpu", model, optimizer, scheduler, TrainResult()) == 5


@pytest.mark.parametrize("write", [write_json_atomically, write_bytes_atomically])
def test_a_write_onto_a_folder_names_the_folder_and_leaves_no_temporary_file(tmp_path, write):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(WriteError, match=f"cannot write '{target}': it is a folder"):
        write(target, {"a": 1} if write is write_json_atomically else b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_write_into_a_read_only_folder_names_the_file(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(WriteError, match=f"cannot write '{folder / 'a.json'}'"):
        write_json_atomically(folder / "a.json", {})


def test_a_full_disk_while_writing_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import sosp_engine.atomic as atomic

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(atomic.DiskFullError, match=str(tmp_path / "analysis.json")):
        write_json_atomically(tmp_path / "analysis.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []
