"""One analysis: a method's saliencies on N' samples, a single pruning order, timings; saved as JSON + a tensor file."""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Callable, Iterator, Literal

import torch
from pydantic import Field
from torch import nn

from ..atomic import MAX_JSON_FILE_BYTES, load_verified, read_regular, save_atomically, write_json_atomically
from ..devices import full_float32, resolve_device
from ..errors import AnalysisError, CheckpointError, SospError, is_out_of_memory
from ..latency.layers import LAYER_TIMING, measure_layer_latency
from ..latency.profile import LATENCY_UNIT, PROFILE_NAME, LatencyProfile, LatencyTiming, Order
from ..latency.runtimes import EAGER, RUNTIMES
from ..nets import weights_fingerprint, zero_layers
from ..nets.setup import ModelSetup, config_from_dict, stored_config
from ..options import check_config
from ..progress import ProgressFn, StopFn, check_cancel, report
from ..pruning.exactness import cached_exactness
from ..pruning.rounding import rounded_order, rounded_stops
from ..pruning.structures import StructureSet
from ..pruning.workbench import Workbench
from .common import LOSSES, AnalysisInputs
from .curvature import CurvatureForm, choose_form
from .memory import MATRIX, budget_bytes, memory_phase, probe
from .methods import METHODS, method_named
from .sosp_i import rows_per_sample
from .selection import (
    NORMALIZATIONS,
    greedy_order,
    objective_prefix,
    order_by_saliency,
    prefix_for_target,
)

RESULT_FORMAT = "sosp-analysis/1"
MC_AUTO_OUTPUTS = 100
MC_AUTO_LABELS = 16


@stored_config
@dataclass
class AnalysisOptions:
    """How an analysis ranks structures, for any model: the method and its settings. Experiments and studies nest
    these as the options of the analyses they run."""

    method: Annotated[
        Literal[METHODS],
        Field(title="Method", description="how structures are ranked (SOSP-H, SOSP-I or a baseline)"),
    ] = "sosp-h"
    at_init: Annotated[
        bool,
        Field(
            title="At initialisation",
            description="analyse a fresh seeded initialisation (BatchNorm statistics re-estimated on the samples)",
        ),
    ] = False
    samples: Annotated[
        int,
        Field(
            ge=1,
            title="Samples N'",
            description="N': analysis samples drawn with the seed from the training split",
        ),
    ] = 1000
    seed: Annotated[
        int,
        Field(
            ge=0, lt=2**63, title="Seed", description="draws the samples (and the weights, at initialisation)"
        ),
    ] = 0
    batch_size: Annotated[
        int,
        Field(
            ge=1,
            title="Batch size",
            description="the largest analysis batch (the memory budget may lower it)",
        ),
    ] = 100
    cap: Annotated[
        float,
        Field(gt=0, le=1, title="Per-layer cap", description="at most this fraction of a layer is pruned"),
    ] = 0.95
    min_channels: Annotated[
        int,
        Field(
            ge=1,
            title="Minimum width kept per layer",
            description="keep at least this many structures (channels) of every layer, whatever the ratio",
        ),
    ] = 1
    normalize: Annotated[
        Literal[NORMALIZATIONS],
        Field(
            title="Normalisation",
            description="rank structures by saliency per unit of cost: kernel size (SOSP*), MACs, or latency (each "
            "layer timed alone; the order then depends on the timings)",
        ),
    ] = "none"
    loss: Annotated[
        Literal[LOSSES], Field(title="Loss", description="the loss the saliencies are taken of")
    ] = "cross-entropy"
    mc_labels: Annotated[
        int,
        Field(
            ge=-1,
            title="Sampled labels (SOSP-I)",
            description="SOSP-I: labels sampled per sample (0: all outputs exactly; -1: sampled only when there are "
            "more than 100 outputs)",
        ),
    ] = -1
    round_to: Annotated[
        int,
        Field(
            ge=1,
            title="Round widths to",
            description="keep widths in multiples of this (8 or 16: pruned nets then run as fast as their MACs)",
        ),
    ] = 1
    memory_budget_gb: Annotated[
        Annotated[float, Field(gt=0)] | Literal["auto"] | None,
        Field(
            json_schema_extra={"aliases": ("--memory-budget",)},
            title="Memory budget (GB)",
            description="GB the analysis may use: the batch is the largest whose measured estimate fits (auto: 80 % "
            "of the free GPU memory or 50 % of the free RAM where it runs; none: the batch as given, no estimate)",
        ),
    ] = None
    latency_device: Annotated[
        str | None,
        Field(
            title="Latency device",
            description="where latency is timed, for the latency normalisation and unit (none: the analysis device)",
        ),
    ] = None
    latency_batch: Annotated[
        int, Field(ge=1, title="Latency batch", description="the batch size latency is timed at")
    ] = 1
    latency_runtime: Annotated[
        Literal[RUNTIMES],
        Field(
            title="Latency runtime",
            description="the runtime latency is timed in: PyTorch eager, or ONNX Runtime (the net exported to ONNX)",
        ),
    ] = EAGER

    def validate(self) -> None:
        """Every value as declared, before any work starts."""
        check_config(self, AnalysisError)


@stored_config
@dataclass
class AnalysisConfig(AnalysisOptions):
    """Everything that determines an analysis, stored with its result: the options and the model setup."""

    setup: ModelSetup = field(default_factory=ModelSetup)

    @classmethod
    def of(cls, setup: ModelSetup, options: AnalysisOptions, **changes: object) -> "AnalysisConfig":
        """The analysis of `setup` with `options` (and `changes` to them, such as a study cell's method)."""
        values = {f.name: getattr(options, f.name) for f in fields(AnalysisOptions)}
        return cls(setup=setup, **{**values, **changes})

    def options(self) -> AnalysisOptions:
        """The options alone (no model): what an experiment or study built from this analysis reuses."""
        return AnalysisOptions(**{f.name: getattr(self, f.name) for f in fields(AnalysisOptions)})

    def weights_label(self) -> str:
        """Which weights the saliencies describe, in words (an at-init analysis never used the checkpoint's values)."""
        if self.at_init:
            return f"at initialisation (seed {self.seed})"
        if self.setup.weights:
            return f"weights {Path(self.setup.weights).name}"
        return "random weights (no checkpoint)"


@dataclass
class AnalysisResult:
    """Per-structure saliencies and the pruning order of one analysis, with its config and timings."""

    config: AnalysisConfig
    keys: list[str]
    layers: list[dict]
    saliency: torch.Tensor
    pruning_order: torch.Tensor
    n_prunable: int
    timings: dict[str, float]
    weights_fingerprint: str
    architecture: str
    first_order: torch.Tensor | None = None
    second_order: torch.Tensor | None = None
    estimate: str = "exact"
    created: float = field(default_factory=time.time)
    exactness: dict | None = (
        None  # approximate layers and the measured pruned-vs-zeroed deviation (exactness.py)
    )
    # predicted_prefix[k]: the loss increase the method predicts for pruning the first k structures of the order
    predicted_prefix: torch.Tensor | None = None
    memory: dict | None = None  # the probe's estimate and the budget that chose the batch size (memory.py)
    layer_latency: str | None = None  # normalize="latency": how the layers were timed (layer_latency.py)
    curvature_form: str | None = None  # SOSP-I: how its Gauss-Newton matrix was kept, and why (curvature.py)
    channels: list[dict] | None = (
        None  # every producer's channels: offered, unprunable, excluded (channel_account)
    )

    def predicted_increase(self, count: int) -> float | None:
        """The method's predicted loss increase for the first `count` structures of the order (None if not stored)."""
        if self.predicted_prefix is None:
            return None
        return float(self.predicted_prefix[min(count, len(self.predicted_prefix) - 1)])

    @property
    def max_ratio(self) -> float:
        """The largest fraction of structures the cap allows to prune."""
        return self.n_prunable / len(self.keys)

    def pruned_vector(self, count: int) -> torch.Tensor:
        """Bool vector of the first `count` structures of the order."""
        pruned = torch.zeros(len(self.keys), dtype=torch.bool)
        pruned[self.pruning_order[: min(count, self.n_prunable)]] = True
        return pruned

    def mask(
        self,
        structures: StructureSet,
        ratio: float,
        unit: str = "structures",
        latency: LatencyProfile | None = None,
    ) -> set[str]:
        """The mask at a target ratio: a prefix of the order, so no saliency is recomputed."""
        return {
            self.keys[i] for i in self.pruning_order[: self.prefix(structures, ratio, unit, latency)].tolist()
        }

    def prefix(
        self,
        structures: StructureSet,
        ratio: float,
        unit: str = "structures",
        latency: LatencyProfile | None = None,
    ) -> int:
        """How many structures of the order the mask at `ratio` of `unit` prunes (a rounding stop if rounded); the
        latency unit needs the order's measured `latency` profile."""
        self.check_structures(structures)
        stops = self.stops(structures)
        if unit == LATENCY_UNIT:
            if latency is None:
                raise AnalysisError(
                    "a latency target needs the latency profile of this analysis (analyze --unit latency)"
                )
            return latency.prefix_for(ratio, self.n_prunable, stops)
        return prefix_for_target(self.pruning_order, self.n_prunable, structures, ratio, unit, stops)

    def stops(self, structures: StructureSet) -> list[int] | None:
        """The prefix lengths a rounded order may stop at (None: any)."""
        if self.config.round_to <= 1:
            return None
        return rounded_stops(self.pruning_order, self.n_prunable, structures, self.config.round_to)

    def opening_setup(self, moved_weights: str | None = None) -> ModelSetup:
        """The setup that reopens the net these saliencies describe: its checkpoint (`moved_weights` where the file
        moved), or none for an analysis at initialisation (its seeded init is rebuilt from the seed)."""
        if self.config.at_init:
            return self.config.setup.with_weights(None)
        return self.config.setup.with_weights(moved_weights or self.config.setup.weights)

    def order(self, structures: StructureSet) -> Order:
        """The pruning order as a value: keys first pruned first, the prunable count, the stops."""
        return Order(self.ordered_keys(), self.n_prunable, self.stops(structures))

    def ordered_keys(self) -> list[str]:
        """Structure keys in pruning order (first pruned first)."""
        return [self.keys[i] for i in self.pruning_order.tolist()]

    def check_structures(self, structures: StructureSet) -> None:
        """Refuse structures of another net; an analysis stored by an earlier version, whose keys name the same
        structures otherwise, is renumbered to them in memory."""
        if structures.keys == self.keys:
            return
        current = structures.current_keys(self.keys)
        if None in current or sorted(current) != sorted(structures.keys):
            raise AnalysisError(
                "this analysis was made on another architecture or exclusion setting than the given model"
            )
        self._renumber(structures, current)

    def _renumber(self, structures: StructureSet, current: list[str]) -> None:
        """Adopt `structures`' keys and numbering; `current[i]` is the key now of the structure stored as i."""
        position = structures.key_index()
        moved = torch.tensor([position[k] for k in current], dtype=torch.long)
        for name in ("saliency", "first_order", "second_order"):
            values = getattr(self, name)
            if values is not None:
                placed = torch.empty_like(values)
                placed[moved] = values
                setattr(self, name, placed)
        self.pruning_order = moved[self.pruning_order]
        layer_names = {old.rpartition(":")[0]: now.rpartition(":")[0] for old, now in zip(self.keys, current)}
        self.layers = [
            {**layer, "name": layer_names.get(layer["name"], layer["name"])} for layer in self.layers
        ]
        self.keys = list(structures.keys)

    def save(self, folder: str | Path) -> Path:
        """Write `analysis.json` and `tensors.pt` into `folder` (written to temporary names, then renamed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": RESULT_FORMAT,
            "config": asdict(self.config),
            "keys": self.keys,
            "layers": self.layers,
            "n_prunable": self.n_prunable,
            "timings": self.timings,
            "weights_fingerprint": self.weights_fingerprint,
            "architecture": self.architecture,
            "estimate": self.estimate,
            "created": self.created,
            "exactness": self.exactness,
            "memory": self.memory,
            "layer_latency": self.layer_latency,
            "curvature_form": self.curvature_form,
            "channels": self.channels,
        }
        tensors = {"saliency": self.saliency, "pruning_order": self.pruning_order}
        if self.first_order is not None:
            tensors["first_order"] = self.first_order
        if self.second_order is not None:
            tensors["second_order"] = self.second_order
        if self.predicted_prefix is not None:
            tensors["predicted_prefix"] = self.predicted_prefix
        save_atomically(tensors, folder / "tensors.pt")
        write_json_atomically(folder / "analysis.json", meta)
        (folder / PROFILE_NAME).unlink(
            missing_ok=True
        )  # timed along the order of an analysis written here before
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AnalysisResult":
        """Read a result written by `save`."""
        folder = Path(folder)
        try:
            meta = json.loads(read_regular(folder / "analysis.json", MAX_JSON_FILE_BYTES))
            tensors = load_verified(folder / "tensors.pt")
        except FileNotFoundError:
            raise AnalysisError(
                f"'{folder}' holds no saved analysis (analysis.json and tensors.pt)"
            ) from None
        except (
            json.JSONDecodeError,
            RuntimeError,
            EOFError,
            OSError,
            UnicodeDecodeError,
            CheckpointError,
        ) as exc:
            first = str(exc).split(". ")[0].strip()  # torch's zip reader appends paragraphs of advice
            raise AnalysisError(
                f"the analysis in '{folder}' is damaged ({first}): run the analysis again"
            ) from None
        if meta.get("format") != RESULT_FORMAT:
            raise AnalysisError(f"'{folder}' is not a SOSP Lab analysis (format {meta.get('format')})")
        try:
            config = config_from_dict(AnalysisConfig, meta["config"])
            config.validate()
            order, n_prunable, count = tensors["pruning_order"], int(meta["n_prunable"]), len(meta["keys"])
        except (KeyError, TypeError, ValueError, SospError) as exc:
            raise AnalysisError(f"the analysis in '{folder}' is damaged: {exc}") from None
        if sorted(order.tolist()) != list(range(count)) or not 0 <= n_prunable <= count:
            raise AnalysisError(
                f"the analysis in '{folder}' is damaged: its pruning order is not a permutation of "
                f"its {count} structures, or n_prunable {n_prunable} is out of range"
            )
        prefix = tensors.get("predicted_prefix")
        if (
            prefix is None and config.method != "sosp-i"
        ):  # written before prefixes were stored: a sum of saliencies
            prefix = saliency_prefix(tensors["saliency"], order, n_prunable)
        return cls(
            config,
            meta["keys"],
            meta["layers"],
            tensors["saliency"],
            tensors["pruning_order"],
            meta["n_prunable"],
            meta["timings"],
            meta["weights_fingerprint"],
            meta["architecture"],
            tensors.get("first_order"),
            tensors.get("second_order"),
            meta.get("estimate", "exact"),
            meta.get("created", 0.0),
            meta.get("exactness"),
            prefix,
            meta.get("memory"),
            meta.get("layer_latency"),
            meta.get("curvature_form"),
            meta.get("channels"),
        )


def saliency_prefix(saliency: torch.Tensor, order: torch.Tensor, n_prunable: int) -> torch.Tensor:
    """Predicted loss increase of each prefix of the order as the sum of its saliencies (the paper's approximation)."""
    taken = saliency.double().cpu()[order[:n_prunable]]
    return torch.cat([torch.zeros(1, dtype=torch.float64), taken.cumsum(0)])


def train_mode_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of batches over n samples; a last batch of one sample joins the previous one (train-mode
    BatchNorm cannot normalise a single sample)."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Replace BatchNorm running statistics by cumulative averages over `x` (train-mode forwards, no gradients)."""
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start, stop in train_mode_batches(len(x), batch_size):
            model(x[start:stop].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@dataclass
class Ranking:
    """A method's saliencies and the pruning order they give under the layer limits, on the CPU in float64."""

    saliency: torch.Tensor
    pruning_order: torch.Tensor
    n_prunable: int
    predicted_prefix: torch.Tensor
    first_order: torch.Tensor | None
    second_order: torch.Tensor | None
    estimate: str
    saliency_seconds: float
    selection_seconds: float
    curvature_form: str | None = None

    def result_fields(self) -> dict:
        """What an AnalysisResult keeps of the ranking."""
        kept = "saliency pruning_order n_prunable first_order second_order estimate predicted_prefix curvature_form"
        return {name: getattr(self, name) for name in kept.split()}


def compute_saliency(
    inputs: AnalysisInputs, options: AnalysisOptions, normalize: str | torch.Tensor, mc_labels: int = 0
) -> Ranking:
    """The method's per-structure saliency and pruning order (plus its first- and second-order parts where it
    has them)."""
    method, structures = method_named(options.method), inputs.structures
    start = time.perf_counter()
    terms = method.terms(inputs, replace(options, mc_labels=mc_labels))
    if not bool(torch.isfinite(terms.saliency).all()):
        raise AnalysisError(
            f"{method.name} gave NaN or infinite saliencies: the weights or the loss on the analysis samples "
            "are not finite (check the checkpoint, or the data's scale)"
        )
    saliency_seconds = time.perf_counter() - start
    start = time.perf_counter()
    limits = {"cap": options.cap, "min_channels": options.min_channels}
    with memory_phase(MATRIX):  # the same size at any batch: the memory probe counts it apart
        if method.greedy:
            increments: list[float] = []
            q, terms.curvature = terms.curvature, None
            order, n_prunable = greedy_order(
                q, structures, normalize=normalize, increments=increments, **limits
            )
            if options.round_to > 1:
                order, n_prunable = rounded_order(order, n_prunable, structures, options.round_to, **limits)
                prefix = objective_prefix(q, order, n_prunable)
            else:  # eq. (2) of each prefix M: sum over s, s' in M of Q[s, s'], the sum of the greedy increments
                steps = torch.tensor(increments, dtype=torch.float64).cumsum(0)
                prefix = torch.cat([torch.zeros(1, dtype=torch.float64), steps])
            del q
        else:
            order, n_prunable = order_by_saliency(terms.saliency, structures, normalize=normalize, **limits)
            order, n_prunable = rounded_order(order, n_prunable, structures, options.round_to, **limits)
            prefix = saliency_prefix(terms.saliency, order, n_prunable)
    return Ranking(
        terms.saliency.detach().double().cpu(),
        order.cpu(),
        n_prunable,
        prefix,
        *(
            t.detach().double().cpu() if t is not None else None
            for t in (terms.first_order, terms.second_order)
        ),
        terms.estimate,
        saliency_seconds,
        time.perf_counter() - start,
        terms.curvature_form,
    )


@full_float32()
def run_analysis(
    workbench: Workbench, options: AnalysisOptions, progress: ProgressFn = None, should_stop: StopFn = None
) -> AnalysisResult:
    """Run one analysis on the workbench's model (or a fresh seeded init when `options.at_init`).

    The result's config is the workbench's setup with `options` (and the batch size used); an `AnalysisConfig` given
    as `options` picks the device. `options` is not changed."""
    device_of = getattr(options, "setup", workbench.setup).device
    config = AnalysisConfig.of(replace(workbench.setup, device=device_of), options)
    config.validate()
    timings: dict[str, float] = {}
    device = resolve_device(config.setup.device)
    report(progress, 0.0, f"drawing {config.samples:,} samples")
    with timed(timings, "samples"):
        x, y = _analysis_samples(workbench, config)
    report(progress, 0.0, "re-estimating BatchNorm statistics" if config.at_init else "copying the model")
    with timed(timings, "batchnorm_statistics" if config.at_init else "model_copy"):
        model = analysed_model(workbench, config, x, device)
        x = x.to(next(model.parameters()).dtype)
    check_cancel(should_stop)
    normalize, layer_latency = config.normalize, None
    if config.normalize == "latency":
        with timed(timings, "layer_latency"):
            normalize, layer_latency = _latency_costs(workbench, model, config, progress, should_stop)
        report(progress, 0.0, layer_latency)
    mc = _sampled_labels(config, workbench.data.num_classes)
    curvature = _curvature_form(model, workbench, config, x, y, mc)

    def inputs_of(n: int, batch: int, observe: ProgressFn = None) -> AnalysisInputs:
        chosen = dict(progress=observe, should_stop=should_stop, curvature=curvature)
        return AnalysisInputs(model, workbench.structures, x[:n], y[:n], config.loss, batch, **chosen)

    def terms(n: int) -> None:
        """The memory probe's run: the terms alone (the selection adds only vectors of S numbers to them)."""
        method_named(config.method).terms(inputs_of(n, n), replace(config, mc_labels=mc))

    def rank(b: int) -> Ranking:
        return compute_saliency(
            inputs_of(len(y), b, lambda f, m: report(progress, f * 0.95, m)), config, normalize, mc
        )

    batch, memory = config.batch_size, None
    if config.memory_budget_gb is not None and min(batch, len(y)) > 1:
        report(progress, 0.0, "measuring the memory it takes per sample (on 1, 2, 4, ... samples)")
        with timed(timings, "memory_probe"):
            batch, memory = _batch_within_budget(terms, device, min(batch, len(y)), config, curvature)
        report(progress, 0.0, memory["line"])
    ranking, batch = _rank_within_memory(rank, batch, device, config, progress)
    _require_ranking(ranking.saliency, config, y, model)
    timings["saliency"], timings["selection"] = ranking.saliency_seconds, ranking.selection_seconds
    fingerprint = weights_fingerprint(model)
    report(progress, 0.97, "measuring that pruning equals zero-masking (exactness)")
    with timed(timings, "exactness"):
        half = {
            workbench.structures.keys[i] for i in ranking.pruning_order[: ranking.n_prunable // 2].tolist()
        }
        exactness = cached_exactness(
            model, workbench.structures, half, workbench.example.to(device), x.to(device), fingerprint
        )
    report(progress, 1.0, "done")
    return AnalysisResult(
        replace(config, batch_size=batch),
        list(workbench.structures.keys),
        [layer.describe() for layer in workbench.structures.layers],
        timings=timings,
        weights_fingerprint=fingerprint,
        architecture=workbench.structures.signature,
        exactness=exactness,
        memory=memory,
        layer_latency=layer_latency,
        channels=workbench.structures.channel_account(),
        **ranking.result_fields(),
    )


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the block takes to `timings[stage]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _analysis_samples(workbench: Workbench, config: AnalysisConfig) -> tuple[torch.Tensor, torch.Tensor]:
    available = len(workbench.data.train_eval)
    if config.samples > available:
        raise AnalysisError(
            f"N' = {config.samples:,} analysis samples were asked for, but the training split of "
            f"'{config.setup.data_spec}' holds {available:,}: use --samples {available} or fewer"
        )
    return workbench.data.analysis_samples(config.samples, config.seed)


def _sampled_labels(config: AnalysisConfig, num_classes: int) -> int:
    """Labels sampled per sample for the Gauss-Newton matrix (0: all outputs exactly)."""
    if not method_named(config.method).gauss_newton:
        return 0
    if config.mc_labels < 0:
        return MC_AUTO_LABELS if num_classes > MC_AUTO_OUTPUTS else 0
    return config.mc_labels


def _latency_costs(
    workbench: Workbench, model: nn.Module, config: AnalysisConfig, progress: ProgressFn, should_stop: StopFn
) -> tuple[torch.Tensor, str]:
    """normalize="latency": the seconds each structure's removal saves, timed layer by layer, and how."""
    table = measure_layer_latency(
        model,
        workbench.structures,
        workbench.example,
        replace(LatencyTiming.of(config, config.setup.device), warmup=LAYER_TIMING.warmup),
        lambda f, m: report(progress, 0.0, m),
        should_stop,
    )
    return table.structure_seconds(workbench.structures), table.describe()


def _curvature_form(
    model: nn.Module, workbench: Workbench, config: AnalysisConfig, x: torch.Tensor, y: torch.Tensor, mc: int
) -> CurvatureForm | None:
    """SOSP-I's form of its Gauss-Newton matrix for all N' samples, chosen before any work (None for other methods)."""
    if not method_named(config.method).greedy:
        return None
    one = AnalysisInputs(model, workbench.structures, x[:1], y[:1], config.loss)
    return choose_form(workbench.structures.num_structures, len(y), rows_per_sample(one, mc), one.device)


def _batch_within_budget(
    rank: Callable[[int], Ranking],
    device: torch.device,
    batch: int,
    config: AnalysisConfig,
    curvature: CurvatureForm | None,
) -> tuple[int, dict]:
    """The largest batch (up to `batch`) whose measured memory estimate fits the budget, and the estimate.

    The probes run on a few samples, so SOSP-I's factor (its size grows with N', not with the batch) is counted at N'.
    """
    budget = budget_bytes(config.memory_budget_gb, device)
    estimate = probe(rank, device, batch, budget)
    if curvature is not None:
        estimate.floor = max(estimate.floor, curvature.bytes)
    chosen = estimate.batch_within(budget, batch)
    return chosen, {
        "fixed_bytes": estimate.fixed,
        "per_sample_bytes": estimate.per_sample,
        "matrix_bytes": estimate.floor,
        "budget_bytes": budget,
        "estimated_peak_bytes": estimate.peak(chosen),
        "batch": chosen,
        "line": estimate.describe(chosen, budget),
    }


def _rank_within_memory(
    rank: Callable[[int], Ranking],
    batch: int,
    device: torch.device,
    config: AnalysisConfig,
    progress: ProgressFn,
) -> tuple[Ranking, int]:
    """The ranking at `batch`, halving the batch on running out of memory (the result does not depend on it)."""
    while True:
        try:
            return rank(batch), batch
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if batch == 1:
                raise AnalysisError(
                    f"{config.method} runs out of memory on {device} even with a batch of one sample: "
                    "use a smaller model or input, exclude layers, or another device"
                ) from None
            batch = max(1, batch // 2)
            report(progress, 0.0, f"out of memory: retrying with batch size {batch}")


def _require_ranking(
    saliency: torch.Tensor, config: AnalysisConfig, y: torch.Tensor, model: nn.Module
) -> None:
    """Refuse to write a mask from saliencies that rank nothing: non-finite, or all zero (the loss did not depend on
    any structure on these samples: one class only, a dead network, a saturated loss)."""
    if not bool(torch.isfinite(saliency).all()):
        raise AnalysisError(
            f"{config.method} gave non-finite saliencies (NaN or inf): check the weights and the data "
            "for overflow, or analyse in float64; no mask was written"
        )
    if saliency.numel() and not bool(saliency.ne(0).any()):
        if zero := zero_layers(model):
            raise AnalysisError(
                f"every {config.method} saliency is zero, so the order would be arbitrary; no mask was written. "
                f"Layer {zero[0]!r} is all zero{' (and ' + str(len(zero) - 1) + ' more)' if len(zero) > 1 else ''}, "
                "so no gradient reaches the layers before it (torchvision initialises ViT heads to zero): analyse "
                "trained weights, or initialise that layer"
            )
        classes = int(y.unique().numel())
        raise AnalysisError(
            f"every {config.method} saliency is zero, so the order would be arbitrary; no mask was "
            f"written. The {len(y)} analysis samples hold {classes} class{'es' if classes != 1 else ''}"
            f"{': a classifier loss needs at least 2' if classes < 2 else ''}; check the data and "
            "that the network is not dead (all-zero activations)"
        )


def analysed_model(
    workbench: Workbench, config: AnalysisConfig, x: torch.Tensor, device: torch.device
) -> nn.Module:
    """The model an analysis runs on, in eval mode on `device`: a copy of the workbench's, or the seeded init with
    BatchNorm statistics re-estimated on the analysis samples `x`."""
    model = workbench.fresh_model(config.seed) if config.at_init else copy.deepcopy(workbench.model)
    model.to(device)
    if config.at_init:
        reestimate_batchnorm(model, x.to(next(model.parameters()).dtype), config.batch_size)
    return model.eval()
