"""The expand study (paper sec. 3.4, Fig. 4): expand-, widen- and train-pruning of one net, and optionally pruning at
initialisation, several trials each, every run pruned to the size of the train-pruned plain net.

The train-prune trials run first: trial 0's trained plain net gives the size target and, unless the widening is given,
the bottlenecks to widen (found on the trained net, as in the paper). Then the other procedures run. Each run is one
resumable `Experiment` in its own folder; finished runs are kept in state.json and never redone.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from ..atomic import read_json
from ..devices import node_name
from ..errors import AnalysisError
from ..nets.data import DataBundle, example_input
from ..nets.setup import ModelSetup, config_from_dict, stored_config
from ..progress import StopFn
from ..pruning.masks import layer_table, load_mask
from ..pruning.workbench import build_for, structures_under
from ..saliency.analysis import AnalysisOptions
from ..saliency.selection import UNITS
from .bottlenecks import paper_widening
from .procedures import Experiment, ExperimentConfig, Reporter, compare_runs
from .studies import FanOut, UnitRun
from .training import TrainConfig

EXPAND_STUDY_KIND = "expand-study"
EXPAND_PROCEDURES = ("expand-prune", "widen-prune", "train-prune", "init-prune")
PLAIN = "train-prune"


@stored_config
@dataclass
class ExpandStudyConfig:
    """Everything an expand study needs; stored with its job so a resume rebuilds the same runs.

    Every run shares the `setup`, the `training` schedule (seeded by its trial) and the `analysis` options."""

    setup: ModelSetup = field(default_factory=ModelSetup)
    procedures: list[str] = field(default_factory=lambda: ["expand-prune", "widen-prune", PLAIN])
    trials: int = 3
    widen: dict[str, float] = field(default_factory=dict)  # empty: the bottlenecks of the trained plain net
    widen_by: float = 2.0  # the factor of the bottlenecks found on the trained net
    target_params: int | None = None  # None: the size of the train-pruned plain net (trial 0)
    ratio: float = 0.5
    unit: str = "params"
    training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10))
    finetune_epochs: int = 10
    analysis: AnalysisOptions = field(default_factory=lambda: AnalysisOptions(samples=500))

    def validate(self) -> None:
        """Every value in range before any work starts."""
        unknown = [p for p in self.procedures if p not in EXPAND_PROCEDURES]
        if unknown or len(set(self.procedures)) != len(self.procedures):
            raise AnalysisError(
                f"an expand study runs distinct procedures from {', '.join(EXPAND_PROCEDURES)}; "
                f"got {self.procedures}"
            )
        if PLAIN not in self.procedures:
            raise AnalysisError(
                "an expand study needs train-prune: its trained plain net sets the size every run is "
                "pruned to and shows the bottlenecks"
            )
        if not isinstance(self.trials, int) or not 1 <= self.trials <= 100:
            raise AnalysisError(f"trials must be a whole number from 1 to 100, got {self.trials}")
        if not (math.isfinite(self.widen_by) and self.widen_by > 0):
            raise AnalysisError(f"the widening factor must be a positive number, got {self.widen_by}")
        if self.unit not in UNITS:
            raise AnalysisError(f"unknown unit '{self.unit}'; use one of {UNITS}")
        if self.training.epochs < 1:
            raise AnalysisError("an expand study trains every net: give at least one epoch")
        for procedure in self.procedures:
            self.experiment(
                procedure, 0, self.widen or {"bottlenecks": self.widen_by}, self.target_params
            ).validate()

    def experiment(
        self, procedure: str, trial: int, widen: dict[str, float], target_params: int | None
    ) -> ExperimentConfig:
        """The procedure's run for one trial: expand-prune widens `widen`, widen-prune matches its size with one factor,
        and every run but the plain net's is pruned to `target_params`."""
        return ExperimentConfig(
            procedure=procedure,
            setup=self.setup,
            training=replace(self.training, seed=trial),
            analysis=self.analysis,
            finetune_epochs=self.finetune_epochs,
            ratio=self.ratio,
            unit=self.unit,
            label=procedure,
            widen=dict(widen) if procedure == "expand-prune" else {},
            match_widen=dict(widen) if procedure == "widen-prune" else {},
            target_params=None if procedure == PLAIN else target_params,
        )

    @property
    def runs(self) -> list[tuple[str, int]]:
        return [(procedure, trial) for procedure in self.procedures for trial in range(self.trials)]


def run_key(procedure: str, trial: int) -> str:
    return f"{procedure}/trial{trial}"


def run_unit(config: dict, folder: str, unit: tuple, report: Reporter | None = None) -> dict:
    """One run of an expand study in a process of its own (a cluster worker); the study records it."""
    return ExpandStudy(config_from_dict(ExpandStudyConfig, config), folder, report).unit(unit)


class ExpandStudy(UnitRun):
    """Runs an expand study in `folder`: the plain net's trials, the plan they give, then the other runs."""

    runner = staticmethod(run_unit)

    def __init__(
        self,
        config: ExpandStudyConfig,
        folder: str | Path,
        report: Reporter | None = None,
        should_stop: StopFn = None,
        data: DataBundle | None = None,
        fan_out: FanOut | None = None,
    ) -> None:
        super().__init__(config, folder, report, should_stop, data, fan_out, {"plan": None, "runs": {}})
        self._done = 0

    def _run_folder(self, procedure: str, trial: int) -> Path:
        return self.folder / procedure / f"trial{trial}"

    def unit(self, unit: tuple) -> dict:
        """One procedure's trial, start to end; its record (final and after-pruning accuracy, size, where and when)."""
        _, procedure, trial = unit
        plan = self.state["plan"] or {"widen": {}, "target_params": None}
        if procedure != PLAIN and self.state["plan"] is None:
            raise AnalysisError(
                f"{run_key(procedure, trial)} needs the plan of the plain net's trials; run the study"
            )
        config = self.config.experiment(procedure, trial, plan["widen"], plan["target_params"])
        started = time.time()
        total = len(self.config.runs)

        def report(fraction: float, message: str, metrics: dict | None) -> None:
            if metrics is not None:
                metrics = {
                    **metrics,
                    "stage": f"{run_key(procedure, trial)} {metrics.get('stage', '')}".strip(),
                }
            self.report(
                min(1.0, (self._done + fraction) / total), f"{run_key(procedure, trial)}: {message}", metrics
            )

        summary = Experiment(
            config, self._run_folder(procedure, trial), report, self.should_stop, self.data
        ).run()
        stages = summary["stages"]
        finetuned = stages.get("finetune", {})
        return {
            "procedure": procedure,
            "label": procedure,
            "trial": trial,
            "test_acc": summary["test_acc"],
            "test_acc_after_pruning": finetuned.get("test_acc_after_pruning"),
            "params": summary["params"],
            "macs": summary["macs"],
            "unpruned_acc": stages.get("train", {}).get("test_acc"),
            "bottlenecks": sorted(self._bottlenecks(trial)) if procedure == PLAIN else None,
            "node": node_name(),
            "started": started,
            "finished": time.time(),
        }

    def _bottlenecks(self, trial: int) -> dict[str, float]:
        """The units the paper's rule flags on a trained plain net's mask, each with the study's factor."""
        return run_widening(
            self.config.setup, self.data, self._run_folder(PLAIN, trial), self.config.widen_by
        )

    def _plan(self) -> dict:
        """The size target and the widening, from trial 0 of the trained plain net."""
        analyzed = read_json(self._run_folder(PLAIN, 0) / "state.json")["done"]["analyze"]
        widen = dict(self.config.widen)
        if not widen:
            widen = self._bottlenecks(0)
            if not widen:
                raise AnalysisError(
                    "the trained plain net shows no bottleneck at this ratio (no unit is pruned less "
                    "than the mean); give the units to widen"
                )
        return {
            "widen": widen,
            "target_params": self.config.target_params or int(analyzed["params_after"]),
            "plain_params": int(analyzed["params_before"]),
            "plain_macs": int(analyzed["macs_before"]),
        }

    def _phase(self, procedures: list[str]) -> None:
        units = [
            ("run", p, t)
            for p, t in self.config.runs
            if p in procedures and run_key(p, t) not in self.state["runs"]
        ]
        for (_, procedure, trial), record in self._execute(units):
            self.state["runs"][run_key(procedure, trial)] = record
            self._save_state()
            self._done = len(self.state["runs"])
            self.report(
                self._done / len(self.config.runs),
                f"{run_key(procedure, trial)}: {record['test_acc']:.1%} at {record['params']:,} params",
                {"stage": "run", "epoch": self._done, **record},
            )

    def run(self) -> dict:
        """Run every unfinished run, the plain net's first; returns the summary with every run's record."""
        self._done = len(self.state["runs"])
        self._phase([PLAIN])
        if self.state["plan"] is None:
            self.state["plan"] = self._plan()
            self._save_state()
        self._phase([p for p in self.config.procedures if p != PLAIN])
        self.report(1.0, "done", None)
        return self.summary()

    def summary(self) -> dict:
        return {
            "procedure": EXPAND_STUDY_KIND,
            "runs": list(self.state["runs"].values()),
            "plan": self.state["plan"],
            "config": asdict(self.config),
            "test_acc": None,
        }


def expand_table(runs: list[dict]) -> pd.DataFrame:
    """Mean and std over trials per procedure: final accuracy, accuracy right after pruning, parameters, MACs."""
    table = compare_runs(runs)
    if table.empty or not runs:
        return table.assign(acc_after_pruning_mean=pd.Series(dtype=float))
    after = pd.DataFrame(runs).groupby("procedure")["test_acc_after_pruning"].mean()
    return table.assign(acc_after_pruning_mean=table.procedure.map(after))


def unpruned_reference(runs: list[dict], plan: dict | None) -> dict | None:
    """The unpruned plain net: its parameters and MACs, and its mean accuracy over the plain trials' training."""
    accs = [r["unpruned_acc"] for r in runs if r["procedure"] == PLAIN and r.get("unpruned_acc") is not None]
    if not plan or not accs:
        return None
    return {"params": plan["plain_params"], "macs": plan["plain_macs"], "test_acc": sum(accs) / len(accs)}


def run_widening(setup: ModelSetup, data: DataBundle, folder: Path, factor: float = 2.0) -> dict[str, float]:
    """The paper's widening from the mask a plain net's run wrote in `folder`: its bottlenecks, each by `factor`."""
    structures = structures_under(setup, build_for(setup.model_spec, data), example_input(data))
    table = layer_table(structures, load_mask(folder / "mask.json", structures))
    return paper_widening(setup.model_spec, table, factor)


def plain_net_widening(
    config: ExperimentConfig,
    folder: str | Path,
    report: Reporter | None = None,
    data: DataBundle | None = None,
    factor: float = 2.0,
) -> dict[str, float]:
    """The bottlenecks of `config`'s plain net, widened by `factor`, as an expand study finds them: the plain net is
    trained first (its given weights are used as trained instead), analysed with the config's options and pruned at
    its ratio; the run is kept in `folder`."""
    epochs = 0 if config.setup.weights else config.training.epochs
    plain = replace(
        config,
        procedure=PLAIN,
        training=replace(config.training, epochs=epochs),
        widen={},
        match_widen={},
        widen_factor=None,
        label=PLAIN,
    )
    run = Experiment(plain, folder, report, data=data)
    run.run(until="analyze")
    return run_widening(plain.setup, run.data, Path(folder), factor)
