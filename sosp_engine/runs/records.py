"""Analyses in the run store: save a result under a name, list them, load them back."""

from __future__ import annotations

from dataclasses import asdict

from ..saliency.analysis import AnalysisResult
from ..errors import AnalysisError, ModelSpecError
from ..nets import is_user_code
from .store import Store


def require_code_consent(model_spec: str, confirmed: bool, where: str) -> None:
    """Stored specs that name user code run only with the user's explicit consent (CLI: --run-code)."""
    if is_user_code(model_spec) and not confirmed:
        raise ModelSpecError(
            f"{where} names user code '{model_spec}', which would be imported and run. "
            "If you trust it, confirm with --run-code (in the dashboard: 'Run this code')."
        )


def store_analysis(store: Store, result: AnalysisResult, name: str = "") -> str:
    """Write the result into the workspace's artifacts and record it; returns its id."""
    record_id, folder = store.new_artifact_dir("analyses")
    result.save(folder)
    config = asdict(result.config)
    label = (
        name.strip()
        or f"{config['method']} on {result.config.setup.model_spec}{' at init' if config['at_init'] else ''}"
    )
    summary = {
        "structures": len(result.keys),
        "max_ratio": result.max_ratio,
        "timings": result.timings,
        "estimate": result.estimate,
        "weights_fingerprint": result.weights_fingerprint,
        "memory": (result.memory or {}).get("line"),
        "layer_latency": result.layer_latency,
        "curvature_form": result.curvature_form,
    }
    store.add_analysis(record_id, label, config, folder, summary)
    return record_id


def load_stored_analysis(store: Store, record_id: str) -> AnalysisResult:
    """The AnalysisResult of a stored record; its files must still name the model and data the record lists."""
    record = store.analysis(record_id)
    result = AnalysisResult.load(record["path"])
    setup = result.config.setup
    if (setup.model_spec, setup.data_spec) != (record["model_spec"], record["data_spec"]):
        raise AnalysisError(
            f"the files of analysis '{record['name']}' were changed after it was stored: they name "
            f"model '{setup.model_spec}' and data '{setup.data_spec}', the record "
            f"'{record['model_spec']}' and '{record['data_spec']}'. Nothing was run; delete or re-run it."
        )
    return result
