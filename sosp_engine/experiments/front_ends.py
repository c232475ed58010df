"""Which declared options each front end that launches work leaves out, and why: the one reviewed list. A front end
is a CLI verb or a dashboard page; the verb's --help and the page's form show its list."""

from __future__ import annotations

from ..options import options_of
from ..saliency.analysis import AnalysisOptions
from .training import TrainConfig

_ON_DEVICE = {"device": "the training runs where the model setup's device says"}
_RUN_ANALYSIS = {
    "seed": "the analysis draws its samples with the run's seed, --seed",
    "at_init": "the procedure decides: prune-at-init analyses the fresh initialisation, the others the trained net",
    "latency_device": "a run's latency is timed on the CPU",
}
# (config class, front end) -> {option: why it is not offered there}; a front end is a CLI verb or a dashboard page
NOT_OFFERED: dict[tuple[type, str], dict[str, str]] = {
    (AnalysisOptions, "expand"): _RUN_ANALYSIS,
    (AnalysisOptions, "jobs submit"): _RUN_ANALYSIS,
    (AnalysisOptions, "study expand"): _RUN_ANALYSIS,
    (AnalysisOptions, "study submit"): {
        "method": "the study runs every method of --methods",
        "seed": "each cell's analysis draws its samples with the cell's seed, from --seeds",
        "latency_device": "a study's latency is timed on the CPU",
    },
    (TrainConfig, "train"): _ON_DEVICE,
    (TrainConfig, "finetune"): _ON_DEVICE,
    (TrainConfig, "expand"): _ON_DEVICE,
    (TrainConfig, "jobs submit"): _ON_DEVICE,
    (TrainConfig, "study submit"): _ON_DEVICE
    | {"seed": "each cell's net is trained with the cell's seed, from --seeds"},
    (TrainConfig, "study expand"): _ON_DEVICE
    | {"seed": "each trial's net is trained with the trial's number as seed"},
    (TrainConfig, "Model page"): _ON_DEVICE,
    (AnalysisOptions, "Studies page"): {
        "method": "the study runs every method chosen under Methods",
        "seed": "each cell's analysis draws its samples with the cell's seed, from Seeds",
        "latency_device": "a study's latency is timed on the CPU",
    },
    (TrainConfig, "Studies page"): _ON_DEVICE
    | {"seed": "each cell's net is trained with the cell's seed, from Seeds"},
    (AnalysisOptions, "Expand page"): {
        option.name: "the expand study reuses the options of the analysis it starts from"
        for option in options_of(AnalysisOptions)
    },
    (TrainConfig, "Expand page"): _ON_DEVICE
    | {"seed": "each trial's net is trained with the trial's number as seed"},
}


def not_offered(cls: type, front_end: str) -> dict[str, str]:
    """The options of `cls` (or of the config it extends) that `front_end` does not offer, with the reasons."""
    return next(
        (NOT_OFFERED[base, front_end] for base in cls.__mro__ if (base, front_end) in NOT_OFFERED), {}
    )
