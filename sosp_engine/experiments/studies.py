"""Studies: a grid of methods x targets x seeds on one model and data, resumable cell by cell, aggregated with
error bars.

Per seed one trained checkpoint (trained here, or the one given); per seed and method one analysis, whose stored order
is sliced at every target (nothing recomputed); per cell the pruned net's accuracy right after pruning and after
fine-tuning, its parameters, MACs and CPU latency (and GPU latency where it ran on a GPU). The work is three
phases of independent units (trainings, analyses,
cells); a `fan_out` (the Ray backend's) runs each phase's units in parallel, the study records each as it finishes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch

from ..atomic import save_atomically
from ..devices import node_name, resolve_device
from ..errors import AnalysisError
from ..latency.profile import (
    ONE_NET,
    LATENCY_UNIT,
    LatencyProfile,
    LatencyTiming,
    measure_latency,
    stored_profile,
)
from ..nets import load_weights
from ..nets.data import DataBundle, example_input
from ..nets.setup import ModelSetup, config_from_dict, stored_config
from ..progress import Cancelled, StopFn
from ..pruning.counting import count_macs, count_params
from ..pruning.masks import pruned_copy
from ..pruning.workbench import Workbench, build_for, structures_under
from ..saliency.analysis import AnalysisConfig, AnalysisOptions, AnalysisResult, run_analysis
from ..saliency.methods import METHODS
from ..saliency.selection import UNITS
from .procedures import Reporter, ResumableRun
from .trainer import train
from .training import TrainConfig, evaluate

STUDY_KIND = "study"


@stored_config
@dataclass
class StudyConfig:
    """Everything a study needs; stored with its job so a resume rebuilds the same grid.

    `setup.weights`: a trained checkpoint shared by every seed (None: train one per seed with `training`); `analysis`:
    the options of every analysis (its method and seed come from the grid)."""

    setup: ModelSetup = field(default_factory=ModelSetup)
    methods: list[str] = field(default_factory=lambda: ["sosp-h", "sosp-i", "magnitude", "random"])
    targets: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    unit: str = "params"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10))
    finetune_epochs: int = 5
    analysis: AnalysisOptions = field(default_factory=lambda: AnalysisOptions(samples=500))

    def validate(self) -> None:
        """Every value in range before any work starts."""
        unknown = [m for m in self.methods if m not in METHODS]
        if not self.methods or unknown:
            raise AnalysisError(f"a study needs methods from {', '.join(METHODS)}; got {self.methods}")
        if not self.targets or not all(
            isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t < 1 for t in self.targets
        ):
            raise AnalysisError(f"study targets must be ratios in [0, 1), got {self.targets}")
        if self.unit not in UNITS + (LATENCY_UNIT,):
            raise AnalysisError(f"unknown unit '{self.unit}'; use one of {UNITS + (LATENCY_UNIT,)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise AnalysisError(f"a study needs distinct seeds >= 0, got {self.seeds}")
        if self.training.epochs < 0 or self.finetune_epochs < 0:
            raise AnalysisError("epochs must be zero or positive")
        if self.setup.weights is None and self.training.epochs == 0:
            raise AnalysisError(
                "give trained weights or at least one training epoch: pruning an untrained net "
                "compares nothing"
            )
        self.train_config(1, 0).validate()
        self.analysis.validate()

    def train_config(self, epochs: int, seed: int) -> TrainConfig:
        return replace(self.training, epochs=epochs, seed=seed, device=self.setup.device)

    @property
    def cells(self) -> list[tuple[int, str, float]]:
        return [
            (seed, method, float(target))
            for seed in self.seeds
            for method in self.methods
            for target in self.targets
        ]


def cell_key(seed: int, method: str, target: float) -> str:
    return f"seed{seed}/{method}/{target:g}"


Unit = tuple  # ("train", seed) | ("analyse", seed, method) | ("cell", seed, method, target)
FanOut = Callable[
    [Callable, dict, str, list, StopFn], Iterator[tuple[Unit, dict]]
]  # (runner, config, folder, ...)


class UnitRun(ResumableRun):
    """A run made of independent units (a study's trainings, analyses and cells; an expand study's runs): in this
    process one after the other, or through a `fan_out` (the Ray backend's) in parallel, each handed to the kind's
    module-level `runner`, which a cluster worker calls."""

    runner: Callable[..., dict]

    def __init__(
        self,
        config,
        folder: str | Path,
        report: Reporter | None,
        should_stop: StopFn,
        data: DataBundle | None,
        fan_out: FanOut | None,
        empty_state: dict,
    ) -> None:
        config.validate()
        self.config = config
        self.fan_out = fan_out
        super().__init__(folder, report, should_stop, data, config.setup.data_spec, empty_state)

    def unit(self, unit: Unit) -> dict:
        raise NotImplementedError

    def _in_process(self, units: list[Unit]) -> Iterator[tuple[Unit, dict]]:
        for unit in units:
            if self.should_stop is not None and self.should_stop():
                raise Cancelled(f"cancelled before {unit}")
            yield unit, self.unit(unit)

    def _execute(self, units: list[Unit]) -> Iterator[tuple[Unit, dict]]:
        """Each unit with its record, as it finishes."""
        if self.fan_out is None or not units:
            return self._in_process(units)
        return self.fan_out(self.runner, asdict(self.config), str(self.folder), units, self.should_stop)


def run_unit(config: dict, folder: str, unit: Unit, report: Reporter | None = None) -> dict:
    """One unit of a study in a process of its own (a cluster worker): it writes its files, the study records it;
    `report` gets the unit's epoch metrics."""
    return Study(config_from_dict(StudyConfig, config), folder, report).unit(unit)


class Study(UnitRun):
    """Runs a study in `folder`; finished trainings, analyses and cells are kept in state.json and never redone."""

    runner = staticmethod(run_unit)

    def __init__(
        self,
        config: StudyConfig,
        folder: str | Path,
        report: Reporter | None = None,
        should_stop: StopFn = None,
        data: DataBundle | None = None,
        fan_out: FanOut | None = None,
    ) -> None:
        super().__init__(config, folder, report, should_stop, data, fan_out, {"trained": {}, "cells": {}})
        self.example = example_input(self.data)
        steps = len(config.seeds) * (1 + len(config.methods)) + len(config.cells)
        self._step, self._steps = 0, steps

    def _progress(self, fraction: float, message: str, metrics: dict | None = None) -> None:
        self.report(min(1.0, (self._step + fraction) / self._steps), message, metrics)

    def _model(self, weights: str) -> torch.nn.Module:
        return load_weights(build_for(self.config.setup.model_spec, self.data), weights)

    def _structures(self, model: torch.nn.Module):
        return structures_under(self.config.setup, model, self.example)

    def _weights(self, seed: int) -> str:
        return self.config.setup.weights or self.state["trained"][f"seed{seed}"]["weights"]

    def _train(self, seed: int) -> dict:
        """Train the seed's net (resumable from its epoch checkpoint); returns where its weights are."""
        torch.manual_seed(seed)
        model = build_for(self.config.setup.model_spec, self.data)
        folder = self.folder / f"seed{seed}"

        def progress(event: dict) -> None:
            if event.get("phase") == "epoch":
                self._progress(
                    event["epoch"] / event["epochs"],
                    f"train seed {seed}: epoch {event['epoch']}",
                    {"stage": f"train-seed{seed}", **event},
                )

        result = train(
            model,
            self.data,
            self.config.train_config(self.config.training.epochs, seed),
            folder / "train",
            progress,
            self.should_stop,
        )
        if result.cancelled:
            raise Cancelled(
                f"cancelled while training seed {seed}; its last epoch checkpoint is kept for resume"
            )
        save_atomically(model.cpu().state_dict(), folder / "trained.pt")
        return {"weights": str(folder / "trained.pt"), "test_acc": result.test_acc}

    def _analysis(self, seed: int, method: str, weights: str) -> AnalysisResult:
        """The seed's analysis by `method` (stored once; every target is a prefix of its order)."""
        folder = self.folder / f"seed{seed}" / method
        if (folder / "analysis.json").exists():
            return AnalysisResult.load(folder)
        model = self._model(weights)
        config = AnalysisConfig.of(
            self.config.setup.with_weights(weights),
            self.config.analysis,
            method=method,
            seed=seed,
            latency_device="cpu",
        )  # where a study's latency unit is timed, too
        workbench = Workbench(config.setup, self.data, model, self._structures(model), self.example)
        result = run_analysis(
            workbench, config, lambda f, m: self._progress(f, f"{method} seed {seed}: {m}"), self.should_stop
        )
        result.save(folder)
        self._latency_profile(
            seed, method, model.eval(), workbench.structures, result
        )  # before the cells slice it
        return result

    def _latency_profile(
        self, seed: int, method: str, model: torch.nn.Module, structures, result: AnalysisResult
    ) -> LatencyProfile | None:
        """The analysis's latency profile when the study targets latency (None otherwise): measured once, refined at
        all the study's targets together, so every cell slices the same stored profile."""
        if self.config.unit != LATENCY_UNIT:
            return None
        return stored_profile(
            result,
            Workbench(result.config.setup, self.data, model, structures, self.example),
            self.folder / f"seed{seed}" / method,
            LatencyTiming.of(result.config, "cpu"),
            list(self.config.targets),
            should_stop=self.should_stop,
        )

    def _cell(self, seed: int, method: str, target: float, weights: str, result: AnalysisResult) -> dict:
        """Prune to the target, test, fine-tune, test again; the pruned net's size, CPU latency (GPU latency too on a
        GPU), where and when."""
        started = time.time()
        model = self._model(weights).eval()
        structures = self._structures(model)
        latency = self._latency_profile(seed, method, model, structures, result)
        mask = result.mask(structures, target, self.config.unit, latency)
        smaller = pruned_copy(model, structures, mask, self.example)
        device = resolve_device(self.config.setup.device)
        test = self.data.loader("test", 512)
        _, acc_pruned = evaluate(smaller.to(device), test, device, amp=False)
        acc_finetuned = acc_pruned
        if self.config.finetune_epochs > 0:
            outcome = train(
                smaller,
                self.data,
                self.config.train_config(self.config.finetune_epochs, seed + 1),
                self.folder / f"seed{seed}" / method / f"finetune-{target:g}",
                None,
                self.should_stop,
            )
            if outcome.cancelled:
                raise Cancelled(f"cancelled while fine-tuning {cell_key(seed, method, target)}")
            acc_finetuned = outcome.test_acc
        latency_gpu_ms = (
            (1000 * measure_latency(smaller, self.example, replace(ONE_NET, device=str(device))))
            if device.type == "cuda"
            else None
        )
        smaller = smaller.cpu()
        return {
            "seed": seed,
            "method": method,
            "target": target,
            "unit": self.config.unit,
            "structures_pruned": len(mask),
            "params": count_params(smaller),
            "macs": count_macs(smaller, self.example),
            "acc_pruned": acc_pruned,
            "acc_finetuned": acc_finetuned,
            "latency_cpu_ms": 1000
            * measure_latency(
                smaller, self.example, replace(ONE_NET, runtime=self.config.analysis.latency_runtime)
            ),
            "latency_runtime": self.config.analysis.latency_runtime,
            "latency_gpu_ms": latency_gpu_ms,
            "node": node_name(),
            "started": started,
            "finished": time.time(),
        }

    def unit(self, unit: Unit) -> dict:
        """Do one unit: train a seed, analyse a seed with a method, or prune, test and fine-tune one cell."""
        kind, seed = unit[0], unit[1]
        if kind == "train":
            return self._train(seed)
        if kind == "analyse":
            self._analysis(seed, unit[2], self._weights(seed))
            return {}
        return self._cell(
            seed, unit[2], unit[3], self._weights(seed), self._analysis(seed, unit[2], self._weights(seed))
        )

    def run(self) -> dict:
        """Run every unfinished training, analysis and cell, phase by phase; returns the summary with all cell
        records."""
        c = self.config
        trainings = [
            ("train", seed)
            for seed in c.seeds
            if not c.setup.weights and f"seed{seed}" not in self.state["trained"]
        ]
        self._step += len(c.seeds) - len(trainings)
        for (_, seed), trained in self._execute(trainings):
            self.state["trained"][f"seed{seed}"] = trained
            self._save_state()
            self._step += 1
        analyses = [
            ("analyse", seed, method)
            for seed in c.seeds
            for method in c.methods
            if not (self.folder / f"seed{seed}" / method / "analysis.json").exists()
        ]
        self._step += len(c.seeds) * len(c.methods) - len(analyses)
        for (_, seed, method), _ in self._execute(analyses):
            self._step += 1
            self._progress(0.0, f"analysis {method} seed {seed} done")
        cells = [("cell", *cell) for cell in c.cells if cell_key(*cell) not in self.state["cells"]]
        self._step += len(c.cells) - len(cells)
        for (_, seed, method, target), record in self._execute(cells):
            key = cell_key(seed, method, target)
            self.state["cells"][key] = record
            self._save_state()
            self._step += 1
            self._progress(
                0.0,
                f"{key}: {record['acc_finetuned']:.1%} after fine-tuning",
                {"stage": "cell", "epoch": len(self.state["cells"]), **record},
            )
        self.report(1.0, "done", None)
        return self.summary()

    def summary(self) -> dict:
        cells = list(self.state["cells"].values())
        return {
            "procedure": STUDY_KIND,
            "cells": cells,
            "trained": self.state["trained"],
            "config": asdict(self.config),
            "test_acc": None,
        }


def aggregate(cells: list[dict]) -> pd.DataFrame:
    """Mean and std over seeds per method and target (std 0 for a single seed)."""
    columns = [
        "method",
        "target",
        "seeds",
        "acc_pruned_mean",
        "acc_pruned_std",
        "acc_finetuned_mean",
        "acc_finetuned_std",
        "params_mean",
        "params_std",
        "macs_mean",
        "macs_std",
        "latency_cpu_ms_mean",
    ]
    if not cells:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(cells)
    grouped = frame.groupby(["method", "target"], sort=False).agg(
        seeds=("seed", "size"),
        acc_pruned_mean=("acc_pruned", "mean"),
        acc_pruned_std=("acc_pruned", "std"),
        acc_finetuned_mean=("acc_finetuned", "mean"),
        acc_finetuned_std=("acc_finetuned", "std"),
        params_mean=("params", "mean"),
        params_std=("params", "std"),
        macs_mean=("macs", "mean"),
        macs_std=("macs", "std"),
        latency_cpu_ms_mean=("latency_cpu_ms", "mean"),
    )
    table = grouped.reset_index().fillna(0.0)[columns]
    if "latency_gpu_ms" in frame and frame.latency_gpu_ms.notna().any():  # cells that ran on a GPU
        table["latency_gpu_ms_mean"] = (
            frame.groupby(["method", "target"], sort=False).latency_gpu_ms.mean().values
        )
    return table
