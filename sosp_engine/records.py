"""Analyses in the run store: save a result under a name, list them, load them back."""
from __future__ import annotations

from dataclasses import asdict

from .analysis import AnalysisResult
from .store import Store


def store_analysis(store: Store, result: AnalysisResult, name: str = "") -> str:
    """Write the result into the workspace's artifacts and record it; returns its id."""
    record_id, folder = store.new_artifact_dir("analyses")
    result.save(folder)
    config = asdict(result.config)
    label = name.strip() or f"{config['method']} on {config['model_spec']}{' at init' if config['at_init'] else ''}"
    summary = {"structures": len(result.keys), "max_ratio": result.max_ratio, "timings": result.timings,
               "estimate": result.estimate, "weights_fingerprint": result.weights_fingerprint}
    store.add_analysis(record_id, label, config, folder, summary)
    return record_id


def load_stored_analysis(store: Store, record_id: str) -> AnalysisResult:
    """The AnalysisResult of a stored record."""
    return AnalysisResult.load(store.analysis(record_id)["path"])
