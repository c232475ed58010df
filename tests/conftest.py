import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

USER_MODEL = f"{ROOT / 'tests' / 'fixtures' / 'user_model.py'}:build"


@pytest.fixture
def user_model_spec() -> str:
    return USER_MODEL


def random_mask(structures, ratio: float, seed: int = 0) -> set[str]:
    """A random mask pruning about `ratio` of every layer, always keeping one channel."""
    gen = torch.Generator().manual_seed(seed)
    keys = set()
    for layer in structures.layers:
        k = min(int(round(ratio * layer.size)), layer.size - 1)
        for c in torch.randperm(layer.size, generator=gen)[:k].tolist():
            keys.add(f"{layer.name}:{c}")
    pruned = structures.pruned_vector(keys)
    for piece in structures.segments():  # a concatenation can make one producer lose all its channels
        if bool(pruned[piece.structure].all()):
            keep = piece.structure[torch.randint(len(piece.structure), (1,), generator=gen)].item()
            pruned[keep] = False
    return {k for k, flag in zip(structures.keys, pruned.tolist()) if flag}


@pytest.fixture
def quiet_machine(monkeypatch) -> None:
    """A quiet machine, stood in for timing: a net's latency is its share of the unpruned net's parameters, with a
    spread of 0.1 %, so latency targets are deterministic where a test is about their plumbing, not about timing."""
    from sosp_engine.cli import main as cli
    from sosp_engine.latency import profile as latency
    from sosp_engine.latency.profile import LatencyComparison
    from sosp_engine.pruning.counting import count_params

    def compare(net, reference, *args, **kwargs):
        relative = count_params(net) / count_params(reference)
        return LatencyComparison(0.01 * relative, relative, 0.001)

    for module in (latency, cli):
        monkeypatch.setattr(module, "compare_latency", compare)
    monkeypatch.setattr(latency, "measure_latency", lambda *args, **kwargs: 0.01)


def wait_for_state(check, guard_s: float, describe=lambda: "the awaited state never came"):
    """Poll `check()` until it returns something true, and return that. `guard_s` only guards against a hang: it
    counts seconds divided by the machine's load per core, so a busy machine waits as much longer as it is slower."""
    spent, last = 0.0, time.monotonic()
    while True:
        value = check()
        if value:
            return value
        time.sleep(0.2)
        now = time.monotonic()
        spent += (now - last) / max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
        last = now
        if spent > guard_s:
            raise AssertionError(describe())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dashboard(workspace: Path) -> Iterator[str]:
    """`streamlit run app/main.py` on a free local port with its own workspace; yields its URL once it answers."""
    port = free_port()
    env = dict(os.environ, SOSP_WORKSPACE=str(workspace))
    command = [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port)]
    command += ["--server.headless", "true", "--server.address", "127.0.0.1"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while proc.poll() is None:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail(f"the streamlit server exited with {proc.returncode} before it answered")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
