"""The paper's procedures (sec. 3.3, 3.4) as resumable stage sequences: train, prune, fine-tune, at init,
expanded, widened."""

from __future__ import annotations

import math

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from ..atomic import read_json, save_atomically, write_json_atomically
from ..errors import AnalysisError
from ..latency.profile import LATENCY_UNIT, LatencyTiming, mask_at_target
from ..nets import load_weights
from ..nets.data import DataBundle, example_input, load_data
from ..nets.setup import ModelSetup, stored_config
from ..progress import Cancelled, StopFn
from ..pruning.counting import count_macs
from ..pruning.masks import load_mask, mask_summary, pruned_copy, save_mask
from ..pruning.surgery import build_widened, every_layer, params_of, uniform_factor
from ..pruning.workbench import Workbench, build_for, open_workbench, structures_under
from ..saliency.analysis import AnalysisConfig, AnalysisOptions, run_analysis
from ..saliency.selection import UNITS
from .trainer import train
from .training import TrainConfig, evaluate

PROCEDURES = ("train", "train-prune", "init-prune", "expand-prune", "widen-prune")
Reporter = Callable[[float, str, dict | None], None]


@stored_config
@dataclass
class ExperimentConfig:
    """One procedure with everything it needs; stored with the job so a resume rebuilds the same run.

    `training` is the schedule of the training stage (its seed is the run's; the device is the setup's), `analysis`
    the options of its analysis (its seed and weights follow the run)."""

    procedure: str = "train-prune"
    setup: ModelSetup = field(default_factory=ModelSetup)
    training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10))
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    finetune_epochs: int | None = None  # None: fine-tuning exactly repeats the training schedule
    ratio: float = 0.5
    unit: str = "structures"
    target_params: int | None = None  # prune to this many parameters instead of `ratio`
    widen: dict[str, float] = field(default_factory=dict)  # expand-prune: layer or stage -> factor
    widen_factor: float | None = None  # widen-prune: one factor for all; solved from `match_widen` when None
    match_widen: dict[str, float] = field(
        default_factory=dict
    )  # widen-prune: match the params of this expansion
    label: str = ""

    def validate(self) -> None:
        if self.procedure not in PROCEDURES:
            raise AnalysisError(f"unknown procedure '{self.procedure}'; use one of {PROCEDURES}")
        if self.training.epochs < 0 or (self.finetune_epochs is not None and self.finetune_epochs < 0):
            raise AnalysisError("epochs must be zero or positive")
        self.train_config(self.training.epochs).validate()
        self.analysis.validate()
        if not (math.isfinite(self.ratio) and 0 <= self.ratio < 1):
            raise AnalysisError(f"the pruning ratio must be in [0, 1), got {self.ratio}")
        if self.unit not in UNITS + (LATENCY_UNIT,):
            raise AnalysisError(f"unknown unit '{self.unit}'; use one of {UNITS + (LATENCY_UNIT,)}")
        if self.target_params is not None and self.target_params <= 0:
            raise AnalysisError(f"the target parameter count must be positive, got {self.target_params}")
        factors = list(self.widen.values()) + list(self.match_widen.values())
        if self.widen_factor is not None:
            factors.append(self.widen_factor)
        if any(not (math.isfinite(f) and f > 0) for f in factors):
            raise AnalysisError(f"widening factors must be positive numbers, got {factors}")

    @property
    def epochs(self) -> int:
        return self.training.epochs

    @property
    def seed(self) -> int:
        return self.training.seed

    def train_config(self, epochs: int, offset: int = 0) -> TrainConfig:
        """The training schedule for a stage of `epochs`, seeded `offset` after the run, on the setup's device."""
        return replace(
            self.training, epochs=epochs, seed=self.training.seed + offset, device=self.setup.device
        )


def check_runnable(config: ExperimentConfig) -> None:
    """Open the model on the data with the weights, and build the widened nets the job would build, so a bad spec,
    path, checkpoint or layer name fails at submit (naming what is wrong), not seconds or a training stage later."""
    workbench = open_workbench(config.setup)
    for factors in (f for f in (config.widen, config.match_widen) if f):
        build_widened(
            config.setup.model_spec,
            workbench.data.num_classes,
            workbench.data.input_shape[0],
            workbench.structures,
            factors,
            workbench.example,
        )


class ResumableRun:
    """A run in `folder` whose finished steps are kept in state.json, so a rerun resumes after them."""

    def __init__(
        self,
        folder: str | Path,
        report: Reporter | None,
        should_stop: StopFn,
        data: DataBundle | None,
        data_spec: str,
        empty_state: dict,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.report = report or (lambda f, m, d=None: None)
        self.should_stop = should_stop
        self.data = data or load_data(data_spec)
        self.state_path = self.folder / "state.json"
        self.state = read_json(self.state_path) or empty_state

    def _save_state(self) -> None:
        write_json_atomically(self.state_path, self.state)


class Experiment(ResumableRun):
    """Runs one procedure in `folder`; every finished stage is recorded in state.json so a rerun resumes after it."""

    def __init__(
        self,
        config: ExperimentConfig,
        folder: str | Path,
        report: Reporter | None = None,
        should_stop: StopFn = None,
        data: DataBundle | None = None,
    ) -> None:
        config.validate()
        self.config = config
        super().__init__(folder, report, should_stop, data, config.setup.data_spec, {"done": {}})
        self.stages = self._stages()

    # helpers ------------------------------------------------------------------------------------------------------

    def _stages(self) -> list[str]:
        p = self.config.procedure
        if p == "train":
            return ["train"]
        if p == "init-prune":
            return ["analyze-at-init", "train-pruned"]
        return (
            ["widen", "train", "analyze", "finetune"]
            if p in ("expand-prune", "widen-prune")
            else ["train", "analyze", "finetune"]
        )

    @property
    def finetune_epochs(self) -> int:
        return self.config.epochs if self.config.finetune_epochs is None else self.config.finetune_epochs

    def _example(self) -> torch.Tensor:
        return example_input(self.data)

    def _build(self, spec: str) -> nn.Module:
        return build_for(spec, self.data)

    def _structures(self, model: nn.Module):
        """The model's prunable structures under the run's exclusions."""
        return structures_under(self.config.setup, model, self._example())

    def _architecture(self) -> tuple[nn.Module, str | None]:
        """The (possibly widened) architecture, freshly initialised with the run's seed."""
        torch.manual_seed(self.config.seed)
        widen = self.state["done"].get("widen", {})
        factors = widen.get("factors", {})
        spec = widen.get("spec") or self.config.setup.model_spec
        if not factors or widen.get("spec"):
            return self._build(spec), spec
        base = self._structures(self._build(self.config.setup.model_spec))
        model, _ = build_widened(
            self.config.setup.model_spec,
            self.data.num_classes,
            self.data.input_shape[0],
            base,
            factors,
            self._example(),
        )
        return model, None

    def _train_stage(
        self, name: str, model: nn.Module, epochs: int, index: int, seed_offset: int = 0
    ) -> dict:
        def progress(event: dict) -> None:
            if event.get("phase") == "train":
                fraction = (event["epoch"] - 1 + event["fraction"]) / max(event["epochs"], 1)
                self.report(
                    (index + fraction) / len(self.stages),
                    f"{name}: epoch {event['epoch']}/{event['epochs']}",
                    None,
                )
            else:
                self.report(
                    (index + event["epoch"] / max(event["epochs"], 1)) / len(self.stages),
                    f"{name}: epoch {event['epoch']}/{event['epochs']} val acc {event['val_acc']:.3f}",
                    {"stage": name, **event},
                )

        result = train(
            model,
            self.data,
            self.config.train_config(epochs, seed_offset),
            self.folder / name,
            progress,
            self.should_stop,
        )
        if result.cancelled:
            raise Cancelled(f"cancelled during {name}; its last epoch checkpoint is kept for resume")
        return {"test_acc": result.test_acc, "test_loss": result.test_loss, "epochs": epochs}

    def _pruned_model(self) -> tuple[nn.Module, set[str]]:
        """Rebuild the trained architecture, load the trained weights and prune it physically with the stored mask."""
        model, spec = self._architecture()
        trained = self.folder / "trained.pt"
        if trained.exists():
            load_weights(model, trained)
        structures = self._structures(model)
        mask = load_mask(self.folder / "mask.json", structures)
        return pruned_copy(model, structures, mask, self._example()), mask

    # stages ---------------------------------------------------------------------------------------------------------
    def _stage_widen(self, index: int) -> dict:
        c = self.config
        spec = c.setup.model_spec
        base_model = self._build(spec)
        base = self._structures(base_model)
        if c.procedure == "expand-prune":
            factors = dict(c.widen)
            if not factors:
                raise AnalysisError(
                    "expand-prune needs the layers or stages to widen (e.g. from the bottleneck analysis)"
                )
        else:
            factor = c.widen_factor
            if factor is None:
                if not c.match_widen:
                    raise AnalysisError(
                        "widen-prune needs a widen_factor or the expansion (match_widen) whose size it matches"
                    )
                expanded, _ = build_widened(
                    spec,
                    self.data.num_classes,
                    self.data.input_shape[0],
                    base,
                    c.match_widen,
                    self._example(),
                )
                factor, _ = uniform_factor(
                    spec,
                    self.data.num_classes,
                    self.data.input_shape[0],
                    base,
                    params_of(expanded),
                    self._example(),
                )
            factors = every_layer(spec, base, factor)
        model, spec = build_widened(
            spec, self.data.num_classes, self.data.input_shape[0], base, factors, self._example()
        )
        return {
            "factors": factors,
            "spec": spec,
            "params_before_widening": params_of(base_model),
            "params": params_of(model),
        }

    def _stage_train(self, index: int) -> dict:
        model, _ = self._architecture()
        if self.config.setup.weights and self.config.procedure == "train-prune":
            load_weights(model, self.config.setup.weights)
        out = self._train_stage("train", model, self.config.epochs, index)
        save_atomically(model.cpu().state_dict(), self.folder / "trained.pt")
        out["weights"] = str(self.folder / "trained.pt")
        out["params"] = params_of(model)
        return out

    def _analysis_config(self, spec: str, at_init: bool) -> AnalysisConfig:
        trained = self.folder / "trained.pt"
        weights = str(trained) if not at_init and trained.exists() else None
        setup = replace(self.config.setup, model_spec=spec, weights=weights)
        return AnalysisConfig.of(
            setup, self.config.analysis, at_init=at_init, seed=self.config.seed, latency_device="cpu"
        )  # where a job's latency unit is timed, too

    def _analyze(self, model: nn.Module, spec: str | None, at_init: bool, index: int) -> dict:
        structures = self._structures(model)
        config = self._analysis_config(spec or self.config.setup.model_spec, at_init)
        workbench = Workbench(config.setup, self.data, model, structures, self._example())
        result = run_analysis(
            workbench,
            config,
            lambda f, m: self.report((index + f) / len(self.stages), f"analyse: {m}", None),
            self.should_stop,
        )
        result.save(self.folder / "analysis")
        ratio, unit = self.config.ratio, self.config.unit
        if self.config.target_params is not None:
            total = structures.counts()[0]
            ratio, unit = max(0.0, 1 - self.config.target_params / total), "params"
        timing = LatencyTiming.of(result.config, "cpu")
        mask, _ = mask_at_target(
            result, workbench, self.folder / "analysis", ratio, unit, timing, should_stop=self.should_stop
        )
        save_mask(
            self.folder / "mask.json",
            structures,
            mask,
            method=self.config.analysis.method,
            ratio=ratio,
            unit=unit,
        )
        return {**mask_summary(structures, mask), "ratio": ratio, "unit": unit, "timings": result.timings}

    def _stage_analyze(self, index: int) -> dict:
        model, spec = self._architecture()
        load_weights(model, self.folder / "trained.pt")
        return self._analyze(model, spec, at_init=False, index=index)

    def _stage_analyze_at_init(self, index: int) -> dict:
        model, spec = self._architecture()
        return self._analyze(model, spec, at_init=True, index=index)

    def _stage_finetune(self, index: int) -> dict:
        model, mask = self._pruned_model()
        before = evaluate(model.to("cpu"), self.data.loader("test", 512), "cpu")
        out = self._train_stage("finetune", model, self.finetune_epochs, index, seed_offset=1)
        save_atomically(model.cpu().state_dict(), self.folder / "final.pt")
        macs = count_macs(model, self._example())
        return {**out, "test_acc_after_pruning": before[1], "params": params_of(model), "macs": macs}

    def _stage_train_pruned(self, index: int) -> dict:
        model, mask = self._pruned_model()
        out = self._train_stage("train-pruned", model, self.config.epochs + self.finetune_epochs, index)
        save_atomically(model.cpu().state_dict(), self.folder / "final.pt")
        macs = count_macs(model, self._example())
        return {**out, "params": params_of(model), "macs": macs}

    def run(self, until: str | None = None) -> dict:
        """Run the remaining stages (up to and including `until`, if given); returns the summary (final test accuracy,
        parameters, MACs, per-stage results)."""
        stages = self.stages[: self.stages.index(until) + 1] if until else self.stages
        for index, stage in enumerate(stages):
            if stage in self.state["done"]:
                continue
            if self.should_stop is not None and self.should_stop():
                raise Cancelled(f"cancelled before {stage}")
            self.report(index / len(self.stages), f"{stage} ...", None)
            handler = getattr(self, "_stage_" + stage.replace("-", "_"))
            self.state["done"][stage] = handler(index)
            self._save_state()
        self.report(1.0, "done", None)
        return self.summary()

    def summary(self) -> dict:
        done = self.state["done"]
        last = done.get("finetune") or done.get("train-pruned") or done.get("train") or {}
        return {
            "procedure": self.config.procedure,
            "label": self.config.label or self.config.procedure,
            "test_acc": last.get("test_acc"),
            "params": last.get("params"),
            "macs": last.get("macs"),
            "stages": done,
            "config": asdict(self.config),
        }


TRIAL_FIELDS = ("seed", "training.seed", "label")  # what may differ between trials of one configuration


def _flat(config: dict, prefix: str = "") -> dict:
    """A stored config with its nested parts' fields as dotted keys ('training.epochs')."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key in ("setup", "training", "analysis"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _setups(summaries: list[dict]) -> list[str]:
    """Each run's configuration in words, by the fields (other than the seed) that differ among the runs: runs of
    different configurations (epochs, ratio, ...) are never averaged as trials of one."""
    configs = [
        {k: v for k, v in _flat(s.get("config") or {}).items() if k not in TRIAL_FIELDS} for s in summaries
    ]
    keys = sorted({k for c in configs for k in c})
    differing = [
        k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1
    ]
    return [", ".join(f"{k}={c.get(k)}" for k in differing) for c in configs]


def compare_runs(summaries: list[dict]) -> pd.DataFrame:
    """Accuracy vs parameters and MACs per procedure label and configuration: mean and std over trials (paper
    Fig. 4b/e); a summary's `config`, where given, keeps runs of different configurations apart."""
    summaries = [s for s in summaries if s.get("test_acc") is not None]
    rows = pd.DataFrame(
        [
            {
                "label": s.get("label") or s["procedure"],
                "setup": setup,
                "procedure": s["procedure"],
                "test_acc": s["test_acc"],
                "params": s["params"],
                "macs": s["macs"],
            }
            for s, setup in zip(summaries, _setups(summaries))
        ]
    )
    if rows.empty:
        return pd.DataFrame(
            columns=[
                "label",
                "setup",
                "procedure",
                "trials",
                "test_acc_mean",
                "test_acc_std",
                "params_mean",
                "params_std",
                "macs_mean",
                "macs_std",
            ]
        )
    grouped = rows.groupby(["label", "setup", "procedure"]).agg(
        trials=("test_acc", "size"),
        test_acc_mean=("test_acc", "mean"),
        test_acc_std=("test_acc", "std"),
        params_mean=("params", "mean"),
        params_std=("params", "std"),
        macs_mean=("macs", "mean"),
        macs_std=("macs", "std"),
    )
    return grouped.reset_index().fillna({"test_acc_std": 0.0, "params_std": 0.0, "macs_std": 0.0})
