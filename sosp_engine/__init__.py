"""SOSP Lab engine: second-order structured pruning (SOSP-I / SOSP-H) and bottleneck analysis, no UI inside.

The rooms, lowest first (a room imports only rooms below it): `nets` (models, data, the model setup), `pruning`
(structures, masks, surgery, counts, the workbench), `latency`, `saliency` (SOSP-I, SOSP-H, baselines, selection, the
analysis), `experiments` (training, procedures, studies, sensitivity, bottlenecks), `runs` (the store, jobs and their
backends), `cli`. The names users reach for are importable from here:

    from sosp_engine import ModelSetup, open_workbench, run_analysis, AnalysisOptions
    workbench = open_workbench(ModelSetup("resnet20", "digits"))
    result = run_analysis(workbench, AnalysisOptions(method="sosp-h", samples=200))

They load on first use, so `import sosp_engine` itself stays light and imports no optional dependency.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

PUBLIC = {  # name -> module that defines it
    "build_model": "nets.registry",
    "is_user_code": "nets.registry",
    "load_weights": "nets.checkpoints",
    "load_data": "nets.data",
    "ModelSetup": "nets.setup",
    "DataBundle": "nets.data",
    "open_workbench": "pruning.workbench",
    "Workbench": "pruning.workbench",
    "find_structures": "pruning.offered",
    "StructureSet": "pruning.structures",
    "load_mask": "pruning.masks",
    "save_mask": "pruning.masks",
    "layer_table": "pruning.masks",
    "mask_summary": "pruning.masks",
    "pruned_copy": "pruning.masks",
    "zeroed_copy": "pruning.masks",
    "count_params": "pruning.counting",
    "count_macs": "pruning.counting",
    "exactness_report": "pruning.exactness",
    "run_analysis": "saliency.analysis",
    "AnalysisConfig": "saliency.analysis",
    "AnalysisOptions": "saliency.analysis",
    "export_pruned": "pruning.export",
    "METHODS": "saliency.methods",
    "AnalysisResult": "saliency.analysis",
    "measure_profile": "latency.profile",
    "LatencyProfile": "latency.profile",
    "train": "experiments.trainer",
    "TrainConfig": "experiments.training",
    "evaluate": "experiments.training",
    "Experiment": "experiments.procedures",
    "ExperimentConfig": "experiments.procedures",
    "Study": "experiments.studies",
    "StudyConfig": "experiments.studies",
    "sensitivity_curve": "experiments.sensitivity",
    "find_bottlenecks": "experiments.bottlenecks",
    "Store": "runs.store",
    "submit": "runs.jobs",
    "submit_study": "runs.jobs",
    "store_analysis": "runs.records",
    "SospError": "errors",
}
__all__ = sorted(PUBLIC)


def __getattr__(name: str) -> object:
    if name not in PUBLIC:
        raise AttributeError(f"module 'sosp_engine' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{PUBLIC[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC))
