"""The README's command-line session runs as written (with tiny epochs and samples), in order, in a fresh folder."""

import os
import re
import shlex
import subprocess
import sys
import time

from conftest import ROOT
from sosp_engine.runs.store import Store

TINY = {
    "--epochs": "1",
    "--samples": "40",
    "--points": "3",
    "--masks": "8",
    "--finetune-epochs": "0",
    "--seeds": "0",
    "--targets": "0.5",
    "--trials": "1",
}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Command line\n.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.splitlines():
        if not line.startswith(".venv/bin/python"):
            continue
        words = shlex.split(line)
        words[0] = sys.executable
        commands.append([TINY.get(words[i - 1], w) if i else w for i, w in enumerate(words)])
    return commands


def test_every_readme_command_runs_as_written(tmp_path):
    env = dict(os.environ, SOSP_WORKSPACE=str(tmp_path / "workspace"), PYTHONPATH=str(ROOT))
    commands = readme_commands()
    assert len(commands) >= 10 and any("sensitivity" in c for c in commands)
    for command in commands:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{shlex.join(command[1:])}\n{done.stderr[-2000:]}"
    store = Store(tmp_path / "workspace")
    for job in store.jobs():
        deadline = time.time() + 300
        while (
            store.job(job["id"])["status"] not in ("done", "failed", "cancelled") and time.time() < deadline
        ):
            time.sleep(0.5)
        assert store.job(job["id"])["status"] == "done", job["name"]
    assert (tmp_path / "runs" / "a1" / "sensitivity.csv").exists() and (
        tmp_path / "runs" / "small-ft.pt"
    ).exists()


def test_what_the_readme_session_writes_is_ignored_by_git():
    written = {
        word.split("/")[0] + "/"
        for command in readme_commands()
        for flag, word in zip(command, command[1:])
        if flag in ("--save", "--out") and "/" in word
    } | {"workspace/"}
    assert written  # the session writes files: runs/..., and the workspace
    for folder in written:
        probe = f"{folder}probe.pt"
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
        assert ignored.returncode == 0, f"{probe} would show in git status"
