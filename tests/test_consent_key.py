"""The consent key is the user's own: a regular file of theirs, mode 0600, in a folder only they can write, created
whole; anything else is refused with what to do, never used."""

import multiprocessing
import os
import stat

import pytest

from sosp_engine.errors import ModelSpecError
from sosp_engine.runs.consent import KEY_BYTES, sign

SPEC = "model.py:build"
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


@pytest.fixture
def key(tmp_path, monkeypatch):
    folder = tmp_path / "config"
    path = folder / "consent.key"
    monkeypatch.setenv("SOSP_CONSENT_KEY", str(path))
    return path


def test_a_first_confirmation_makes_a_private_regular_key_in_a_private_folder(key):
    sign(SPEC)
    info = key.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert len(key.read_bytes()) == KEY_BYTES and [p.name for p in key.parent.iterdir()] == ["consent.key"]


def test_a_key_signs_the_same_spec_the_same_way_every_time(key):
    assert sign(SPEC) == sign(SPEC) != sign(SPEC + "x")


@pytest.mark.parametrize("mode", [0o666, 0o644, 0o640, 0o620, 0o602])
def test_a_key_others_may_read_or_write_is_refused(key, mode):
    sign(SPEC)
    key.chmod(mode)
    with pytest.raises(ModelSpecError, match="mode 0") as err:
        sign(SPEC)
    assert "Remove it" in str(err.value) and "SOSP_CONSENT_KEY" in str(err.value)


def test_a_key_that_is_a_link_is_refused_even_to_a_private_file(key, tmp_path):
    target = tmp_path / "elsewhere.key"
    target.write_bytes(b"k" * KEY_BYTES)
    target.chmod(0o600)
    key.parent.mkdir(mode=0o700)
    key.symlink_to(target)
    with pytest.raises(ModelSpecError, match="symbolic link"):
        sign(SPEC)


@pytest.mark.parametrize("make", [os.mkfifo, os.mkdir])
def test_a_key_that_is_not_a_regular_file_is_refused_without_blocking(key, make):
    key.parent.mkdir(mode=0o700)
    make(key)
    with pytest.raises(ModelSpecError, match="not a regular file"):
        sign(SPEC)


@AS_ROOT
def test_a_key_owned_by_another_user_is_refused(key):
    sign(SPEC)
    os.chown(key, 65534, 65534)
    with pytest.raises(ModelSpecError, match="belongs to user id 65534"):
        sign(SPEC)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_key_in_a_folder_others_can_write_is_refused(key, mode):
    sign(SPEC)
    key.parent.chmod(mode)
    with pytest.raises(ModelSpecError, match="can be written by others"):
        sign(SPEC)


@pytest.mark.parametrize("length", [0, 5, KEY_BYTES + 1])
def test_a_key_of_the_wrong_length_is_refused_and_kept(key, length):
    key.parent.mkdir(mode=0o700)
    key.write_bytes(b"k" * length)
    key.chmod(0o600)
    with pytest.raises(ModelSpecError, match=f"holds {length} bytes"):
        sign(SPEC)
    assert key.read_bytes() == b"k" * length


def _sign_in_child(_: int) -> str:
    return sign(SPEC)


def test_twenty_first_confirmations_at_once_all_sign_with_one_whole_key(key):
    with multiprocessing.get_context("fork").Pool(20) as pool:
        tokens = pool.map(_sign_in_child, range(20), chunksize=1)
    assert len(set(tokens)) == 1 and tokens[0] == sign(SPEC)
    assert [p.name for p in key.parent.iterdir()] == ["consent.key"]
