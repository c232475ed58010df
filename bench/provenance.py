"""What every generated benchmark table states about its run, and how it lands in docs/benchmarks.md.

Each generated section of the docs sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; a new run
replaces the whole section, so a stale table is never kept beside a fresh one.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"


def provenance(threads: int, layout: str, whole_call: str) -> dict:
    """The commit, date, machine load, threads and process layout of this run (`layout`: e.g. "one process, warm,
    interleaved"; `whole_call`: what the timed call includes)."""
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        commit += "+changes" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "layout": layout,
        "whole_call": whole_call,
    }


def provenance_line(p: dict) -> str:
    """One markdown line stating the run's provenance."""
    load = ", ".join(f"{v:.2f}" for v in p["load_average"])
    if "load_average_end" in p:
        load += " at the start, " + ", ".join(f"{v:.2f}" for v in p["load_average_end"]) + " at the end"
    else:
        load += " at the start"
    return (
        f"Measured {p['date']} at commit `{p['commit']}` on {p['cpus']} CPUs (load average {load}), "
        f"{p['threads']} torch thread(s), torch {p['torch']}; {p['layout']}; {p['whole_call']}."
    )


def replace_section(name: str, markdown: str, path: Path = DOCS) -> None:
    """Put `markdown` between the section's markers in `path` (appended with its markers when it is not there)."""
    begin, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    path.write_text(text)


def finished(p: dict) -> dict:
    """The provenance with the load average at the end of the run added."""
    return {**p, "load_average_end": [round(v, 2) for v in os.getloadavg()]}


def dated_results(stem: str) -> Path:
    """bench/results/STEM-YYYY-MM-DD.jsonl (a new file per day; rows are appended)."""
    out = ROOT / "bench" / "results" / f"{stem}-{datetime.date.today().isoformat()}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def publish(stem: str, section: str | None, rows: list[dict], run: dict, render) -> Path:
    """End a benchmark: the load at its end added to `run`, every row appended to bench/results/STEM-DATE.jsonl with
    the provenance, the rendered table printed and, unless `section` is None, put into docs/benchmarks.md."""
    run = finished(run)
    out = dated_results(stem)
    with out.open("a") as fh:
        fh.writelines(json.dumps({**row, **run}) + "\n" for row in rows)
    markdown = render(rows, run) + f"\n\nRows: `{out.relative_to(ROOT)}`."
    print(markdown)
    if section is not None:
        replace_section(section, markdown)
    return out
