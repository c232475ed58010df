"""What the cluster path costs: `jobs list` while a Ray job runs, how long a job's events take to reach the store,
and the scheduling overhead per study unit, on a local 2-node Ray cluster this script starts (head with 2 CPUs, a
second node with 1 CPU) and stops.

    python bench/cluster.py [--no-docs]

Writes bench/results/cluster-DATE.jsonl and the "cluster" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import ROOT, provenance, provenance_line, publish  # noqa: E402

RAY = str(Path(sys.executable).parent / "ray")
UNITS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_cluster() -> tuple[str, list[subprocess.Popen]]:
    """A head (2 CPUs) and a second node (1 CPU), each `ray start --block` in a process group of its own, so that
    stopping them touches no other Ray cluster on the machine."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    flags = ["--num-gpus", "0", "--disable-usage-stats", "--block"]
    head = [RAY, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"]
    node = [RAY, "start", "--address", address, "--num-cpus", "1"]
    started = []
    for command in (head, node):
        started.append(
            subprocess.Popen(
                command + flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
        )
        time.sleep(10)  # the head up before the node joins
    return address, started


def _cli_seconds(workspace: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sosp_engine", "jobs", "list", "--workspace", str(workspace)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return time.perf_counter() - start


def _empty_unit(config: dict, folder: str, unit: tuple, report) -> dict:
    return {"unit": list(unit)}


def measure(address: str, tmp: Path) -> list[dict]:
    from sosp_engine.experiments.procedures import ExperimentConfig
    from sosp_engine.nets.setup import config_from_dict
    from sosp_engine.runs.backends.ray import sync
    from sosp_engine.runs.events import new_events
    from sosp_engine.runs.jobs import Placement, submit
    from sosp_engine.runs.store import Store, run_folder

    rows = []
    idle = tmp / "idle"
    Store(idle)
    cli_idle = [_cli_seconds(idle) for _ in range(5)]
    store = Store(tmp / "ws")
    config = config_from_dict(
        ExperimentConfig,
        dict(procedure="train", model_spec="resnet20", epochs=40, batch_size=64, device="cpu"),
    )
    job_id = submit(store, config, placement=Placement("ray", address, str(tmp / "shared")))
    job = store.job(job_id)
    while not [e for e in new_events(run_folder(job), {})[0] if e["kind"] == "metrics"]:
        time.sleep(0.2)
    cli_busy = [_cli_seconds(tmp / "ws") for _ in range(5)]
    refresh = []
    for _ in range(20):  # what the dashboard does every 3 s: bring the store up to date, read the jobs
        start = time.perf_counter()
        sync(store)
        store.jobs()
        refresh.append(time.perf_counter() - start)
        time.sleep(0.2)
    polled_from = time.time()  # from here only this loop reads the job's events, once a second
    while store.job(job_id)["status"] in ("queued", "starting", "running"):
        sync(store)
        time.sleep(1.0)
    events = {
        e["payload"]["epoch"]: e["time"] for e in new_events(run_folder(job), {})[0] if e["kind"] == "metrics"
    }
    lags = [m["time"] - events[m["epoch"]] for m in store.metrics(job_id) if events[m["epoch"]] > polled_from]
    rows.append(
        {
            "measure": "jobs list",
            "cli_idle_s": statistics.median(cli_idle),
            "cli_with_ray_job_s": statistics.median(cli_busy),
            "refresh_with_ray_job_ms": 1000 * statistics.median(refresh),
            "status": store.job(job_id)["status"],
        }
    )
    rows.append(
        {
            "measure": "ingestion lag",
            "poll_s": 1.0,
            "median_s": statistics.median(lags),
            "max_s": max(lags),
            "epochs": len(lags),
        }
    )
    import ray

    from sosp_engine.runs.backends.ray_cluster import connect, ray_fan_out

    connect(address)
    fan_out = ray_fan_out({"num_cpus": 1, "num_gpus": 0}, str(tmp / "units"), 0)
    (tmp / "units").mkdir()
    slots = int(ray.cluster_resources().get("CPU", 1))
    for label, units in (("warm-up", 3), ("units", UNITS)):
        start = time.perf_counter()
        done = list(fan_out(_empty_unit, {}, str(tmp / "units"), [(i,) for i in range(units)], None))
        wall = time.perf_counter() - start
    rows.append(
        {
            "measure": "scheduling per unit",
            "units": len(done),
            "slots": slots,
            "wall_s": wall,
            "per_unit_ms": 1000 * wall * slots / len(done),
        }
    )
    ray.shutdown()
    return rows


def render(rows: list[dict], run: dict) -> str:
    listing, lag, units = rows
    return "\n".join(
        [
            "## The cluster path (`python bench/cluster.py`)",
            "",
            provenance_line(run),
            "",
            "A local 2-node Ray cluster (head: 2 CPUs, second node: 1 CPU) on this machine, shared storage on the "
            "local disk; the job trains ResNet-20 on digits for 40 epochs on one CPU.",
            "",
            "| what | measured |",
            "| --- | --- |",
            f"| `jobs list` (a new CLI process), no job | {listing['cli_idle_s']:.2f} s |",
            f"| `jobs list` while a Ray job runs | {listing['cli_with_ray_job_s']:.2f} s (no Ray connection: the "
            "job's files are read) |",
            f"| the dashboard's refresh (bring the store up to date, read the jobs) while a Ray job runs | "
            f"{listing['refresh_with_ray_job_ms']:.1f} ms |",
            f"| ingestion lag of an epoch's metrics (event written -> in the store), polled every {lag['poll_s']:.0f} s"
            f" | median {lag['median_s']:.2f} s, max {lag['max_s']:.2f} s over {lag['epochs']} epochs |",
            f"| scheduling overhead per study unit ({units['units']} empty units through the study fan-out on "
            f"{units['slots']} CPUs, workers warm) | {units['per_unit_ms']:.1f} ms per unit per slot "
            f"({1000 * units['wall_s']:.0f} ms in all) |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    run = provenance(
        1, "a local 2-node Ray cluster, one job at a time", "each figure is the user-visible call"
    )
    address, processes = _start_cluster()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(address, Path(tmp))
    finally:
        for process in reversed(processes):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    publish("cluster", None if args.no_docs else "cluster", rows, run, render)


if __name__ == "__main__":
    main()
