"""The paper's procedures (sec. 3.3, 3.4) as resumable stage sequences: train, prune, fine-tune, at init,
expanded, widened."""

from __future__ import annotations

import math

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from ..saliency.analysis import AnalysisConfig, run_analysis
from ..saliency.selection import UNITS
from ..pruning.counting import count_macs
from ..latency.profile import LATENCY_UNIT, stored_profile
from ..latency.runtimes import EAGER
from ..nets.data import DataBundle, load_data
from ..errors import AnalysisError
from ..nets.loading import Workbench, example_input, open_workbench, resolve_preset
from ..pruning.masks import load_mask, mask_summary, pruned_copy, save_mask
from ..nets import build_model, load_weights
from ..progress import Cancelled, StopFn
from ..pruning.offered import find_structures
from ..pruning.surgery import build_widened, every_layer, params_of, uniform_factor
from ..atomic import save_atomically, write_json_atomically
from .trainer import train
from .training import TrainConfig, evaluate

PROCEDURES = ("train", "train-prune", "init-prune", "expand-prune", "widen-prune")
Reporter = Callable[[float, str, dict | None], None]


@dataclass
class ExperimentConfig:
    """One procedure with everything it needs; stored with the job so a resume rebuilds the same run."""

    procedure: str = "train-prune"
    model_spec: str = "resnet20"
    data_spec: str = "digits"
    weights: str | None = None
    epochs: int = 10
    finetune_epochs: int | None = None  # None: fine-tuning exactly repeats the training schedule
    method: str = "sosp-h"
    samples: int = 1000
    ratio: float = 0.5
    unit: str = "structures"
    target_params: int | None = None  # prune to this many parameters instead of `ratio`
    cap: float = 0.95
    normalize: str = "none"
    widen: dict[str, float] = field(default_factory=dict)  # expand-prune: layer or stage -> factor
    widen_factor: float | None = None  # widen-prune: one factor for all; solved from `match_widen` when None
    match_widen: dict[str, float] = field(
        default_factory=dict
    )  # widen-prune: match the params of this expansion
    lr: float = 0.1
    batch_size: int = 128
    schedule: str = "step"
    seed: int = 0
    device: str = "auto"
    exclude: list[str] = field(default_factory=list)
    preset: str | None = "auto"
    label: str = ""
    nproc: int = 1  # training stages across this many processes (DistributedDataParallel)
    sync_bn: bool = False
    latency_runtime: str = EAGER  # where the latency unit (CPU, batch 1) is timed: eager or onnxruntime

    def validate(self) -> None:
        if self.procedure not in PROCEDURES:
            raise AnalysisError(f"unknown procedure '{self.procedure}'; use one of {PROCEDURES}")
        if self.epochs < 0 or (self.finetune_epochs is not None and self.finetune_epochs < 0):
            raise AnalysisError("epochs must be zero or positive")
        self.train_config(self.epochs).validate()
        AnalysisConfig(
            method=self.method,
            samples=self.samples,
            cap=self.cap,
            normalize=self.normalize,
            latency_runtime=self.latency_runtime,
        ).validate()
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

    def train_config(self, epochs: int, offset: int = 0) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            schedule=self.schedule,
            seed=self.seed + offset,
            device=self.device,
            nproc=self.nproc,
            sync_bn=self.sync_bn,
        )

    @property
    def preset_name(self) -> str | None:
        return resolve_preset(self.model_spec, self.preset)


def check_runnable(config: ExperimentConfig) -> None:
    """Open the model on the data with the weights, and build the widened nets the job would build, so a bad spec,
    path, checkpoint or layer name fails at submit (naming what is wrong), not seconds or a training stage later."""
    workbench = open_workbench(
        config.model_spec, config.data_spec, config.weights, config.exclude, config.preset
    )
    for factors in (f for f in (config.widen, config.match_widen) if f):
        build_widened(
            config.model_spec,
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
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else empty_state

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
        super().__init__(folder, report, should_stop, data, config.data_spec, {"done": {}})
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
        return build_model(spec, self.data.num_classes, self.data.input_shape[0])

    def _structures(self, model: nn.Module):
        """The model's prunable structures under the run's exclusions."""
        return find_structures(model, self._example(), self.config.exclude, self.config.preset_name)

    def _architecture(self) -> tuple[nn.Module, str | None]:
        """The (possibly widened) architecture, freshly initialised with the run's seed."""
        torch.manual_seed(self.config.seed)
        widen = self.state["done"].get("widen", {})
        factors = widen.get("factors", {})
        spec = widen.get("spec") or self.config.model_spec
        if not factors or widen.get("spec"):
            return self._build(spec), spec
        base = self._structures(self._build(self.config.model_spec))
        model, _ = build_widened(
            self.config.model_spec,
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
        base_model = self._build(c.model_spec)
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
                    c.model_spec,
                    self.data.num_classes,
                    self.data.input_shape[0],
                    base,
                    c.match_widen,
                    self._example(),
                )
                factor, _ = uniform_factor(
                    c.model_spec,
                    self.data.num_classes,
                    self.data.input_shape[0],
                    base,
                    params_of(expanded),
                    self._example(),
                )
            factors = every_layer(c.model_spec, base, factor)
        model, spec = build_widened(
            c.model_spec, self.data.num_classes, self.data.input_shape[0], base, factors, self._example()
        )
        return {
            "factors": factors,
            "spec": spec,
            "params_before_widening": params_of(base_model),
            "params": params_of(model),
        }

    def _stage_train(self, index: int) -> dict:
        model, _ = self._architecture()
        if self.config.weights and self.config.procedure == "train-prune":
            load_weights(model, self.config.weights)
        out = self._train_stage("train", model, self.config.epochs, index)
        save_atomically(model.cpu().state_dict(), self.folder / "trained.pt")
        out["weights"] = str(self.folder / "trained.pt")
        out["params"] = params_of(model)
        return out

    def _analysis_config(self, spec: str, at_init: bool) -> AnalysisConfig:
        c = self.config
        trained = self.folder / "trained.pt"
        weights = str(trained) if not at_init and trained.exists() else None
        return AnalysisConfig(
            method=c.method,
            model_spec=spec,
            data_spec=c.data_spec,
            weights=weights,
            at_init=at_init,
            samples=c.samples,
            seed=c.seed,
            cap=c.cap,
            normalize=c.normalize,
            device=c.device,
            exclude=list(c.exclude),
            preset=c.preset,
            latency_device="cpu",
            latency_runtime=c.latency_runtime,
        )  # where a job's latency unit is timed, too

    def _analyze(self, model: nn.Module, spec: str | None, at_init: bool, index: int) -> dict:
        structures = self._structures(model)
        workbench = Workbench(
            spec or self.config.model_spec, self.data, model, structures, None, self._example()
        )
        config = self._analysis_config(spec or self.config.model_spec, at_init)
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
        latency = (
            stored_profile(
                result,
                model,
                structures,
                self._example(),
                self.folder / "analysis",
                should_stop=self.should_stop,
                targets=[ratio],
                runtime=self.config.latency_runtime,
            )
            if unit == LATENCY_UNIT
            else None
        )
        mask = result.mask(structures, ratio, unit, latency)
        save_mask(
            self.folder / "mask.json", structures, mask, method=self.config.method, ratio=ratio, unit=unit
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

    def run(self) -> dict:
        """Run the remaining stages; returns the summary (final test accuracy, parameters, MACs, per-stage results)."""
        for index, stage in enumerate(self.stages):
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


TRIAL_FIELDS = ("seed", "label")  # what may differ between trials of one configuration


def _setups(summaries: list[dict]) -> list[str]:
    """Each run's configuration in words, by the fields (other than the seed) that differ among the runs: runs of
    different configurations (epochs, ratio, ...) are never averaged as trials of one."""
    configs = [{k: v for k, v in (s.get("config") or {}).items() if k not in TRIAL_FIELDS} for s in summaries]
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
