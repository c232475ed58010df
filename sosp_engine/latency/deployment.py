"""What a mask buys at deployment: along a pruning order (and the order rounded to multiples of 8 or 16), the MAC
drop of the physically pruned net against its measured latency drop in each runtime and batch size, and their ratio
(the efficiency: 1 when every saved MAC turns into saved time)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..errors import AnalysisError
from ..progress import ProgressFn, StopFn, check_cancel, report
from ..pruning.counting import count_macs
from ..pruning.masks import pruned_copy
from ..pruning.structures import StructureSet
from ..pruning.rounding import rounded_order, rounded_stops
from .profile import LatencyTiming, Order, compare_latency, next_stop, prefix_grid
from .runtimes import check_runtime

EFFICIENCY_COLUMNS = [
    "order",
    "structures_pruned",
    "mac_drop",
    "runtime",
    "batch",
    "pruned_ms",
    "unpruned_ms",
    "spread_ms",
    "latency_drop",
    "drop_error",
    "resolved",
    "efficiency",
    "threads",
    "device",
]


def order_variants(result, structures: StructureSet, round_to: list[int]) -> dict[str, Order]:
    """The analysis's order and its order regrouped to multiples of each of `round_to` (> 1), by label."""
    variants = {"as analysed": result.order(structures)}
    for multiple in sorted({r for r in round_to if r > 1}):
        order, n_prunable = rounded_order(
            result.pruning_order,
            result.n_prunable,
            structures,
            multiple,
            result.config.cap,
            result.config.min_channels,
        )
        keys = [result.keys[i] for i in order.tolist()]
        stops = rounded_stops(order, n_prunable, structures, multiple)
        variants[f"rounded to {multiple}"] = Order(keys[:n_prunable], n_prunable, stops)
    return variants


@dataclass(frozen=True)
class DeploymentGrid:
    """What a deployment comparison times: each runtime at each batch on one device, at `points` evenly spaced
    prefixes of each order (or at the prefixes pruning `ratios` of all structures)."""

    runtimes: list[str]
    batches: list[int]
    points: int = 5
    device: str = "cpu"
    repeats: int = 10
    ratios: list[float] | None = None

    def prefixes(self, order: Order, n_structures: int) -> list[int]:
        stops = order.stops or list(range(order.n_prunable + 1))
        if self.ratios is None:
            return [k for k in prefix_grid(order.n_prunable, self.points, stops) if k > 0]
        return [k for k in prefixes_at(self.ratios, n_structures, order.n_prunable, stops) if k > 0]


def prefixes_at(ratios: list[float], n_structures: int, n_prunable: int, stops: list[int]) -> list[int]:
    """The prefix pruning each ratio of all `n_structures` (the next stop of the order), within its `n_prunable`."""
    if any(not 0 < r < 1 for r in ratios):
        raise AnalysisError(f"pruning ratios must be in (0, 1), got {ratios}")
    wanted = [min(round(r * n_structures), n_prunable) for r in ratios]
    return sorted({next_stop(k, stops) for k in wanted})


def efficiency_table(
    workbench,
    orders: dict[str, Order],
    grid: DeploymentGrid,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> pd.DataFrame:
    """At the grid's prefixes of each order: the net pruned there, its MAC drop counted over every call, and in each
    runtime at each batch its latency timed alternately with the unpruned net (medians, their spread), one row each."""
    for runtime in grid.runtimes:
        check_runtime(runtime)
    if not grid.runtimes or not grid.batches or any(b < 1 for b in grid.batches):
        raise AnalysisError(
            f"give at least one runtime and batch sizes >= 1 (got {grid.runtimes}, {grid.batches})"
        )
    model, structures, example = workbench.model, workbench.structures, workbench.example
    device = torch.device(grid.device)
    base_macs = count_macs(model, example)
    plan = [
        (label, order.keys, k)
        for label, order in orders.items()
        for k in grid.prefixes(order, structures.num_structures)
    ]
    rows, steps = [], max(1, len(plan) * len(grid.runtimes) * len(grid.batches))
    for label, keys, k in plan:
        smaller = pruned_copy(model, structures, set(keys[:k]), example)
        mac_drop = 1 - count_macs(smaller, example) / base_macs
        for runtime in grid.runtimes:
            for batch in grid.batches:
                check_cancel(should_stop)
                report(progress, len(rows) / steps, f"{label}: {k} structures, {runtime} at batch {batch}")
                timing = LatencyTiming(str(device), batch, runtime, repeats=grid.repeats)
                measured = compare_latency(smaller, model, example, timing)
                drop = 1 - measured.relative
                unpruned_ms = 1000 * measured.seconds / measured.relative
                rows.append(
                    [
                        label,
                        k,
                        mac_drop,
                        runtime,
                        batch,
                        1000 * measured.seconds,
                        unpruned_ms,
                        unpruned_ms * measured.error,
                        drop,
                        measured.error,
                        measured.resolved,
                        drop / mac_drop if mac_drop > 0 else float("nan"),
                        torch.get_num_threads(),
                        str(device),
                    ]
                )
    report(progress, 1.0, "deployment latency measured")
    return pd.DataFrame(rows, columns=EFFICIENCY_COLUMNS)


def unresolved_warning(table: pd.DataFrame) -> str | None:
    """A line naming how many rows' latency drop is within their timing spread (their efficiency is noise), or None."""
    unresolved = table[~table["resolved"].astype(bool)]
    if unresolved.empty:
        return None
    return (
        f"{len(unresolved)} of {len(table)} rows measured a latency drop within twice its standard error: their "
        "efficiency is timing noise, not a property of the mask (marked resolved=False). Time at a larger batch, with "
        "more repeats, or on a quieter machine"
    )


def efficiency_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per order, runtime and batch: the efficiency's median, lowest and highest over the measured prefixes."""
    return (
        table.groupby(["order", "runtime", "batch"], sort=False)["efficiency"]
        .agg(efficiency_median="median", efficiency_min="min", efficiency_max="max", prefixes="count")
        .reset_index()
    )
