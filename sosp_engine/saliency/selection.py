"""From saliencies to a single pruning order over all structures, honouring per-layer caps and floors, and targets."""

from __future__ import annotations

import math

import torch

from ..errors import AnalysisError
from ..pruning.rounding import layer_limit
from ..pruning.structures import StructureSet
from .curvature import FactorRows, MatrixRows, row_source

NORMALIZATIONS = ("none", "kernel", "macs", "latency")
UNITS = ("structures", "params", "macs")


class Budget:
    """Which structures may still be pruned: at most `cap` of each layer, at least `min_channels` of each layer and
    one channel of every producer kept."""

    def __init__(self, structures: StructureSet, cap: float, min_channels: int = 1) -> None:
        if not 0 < cap <= 1:
            raise AnalysisError(f"the per-layer cap must be in (0, 1], got {cap}")
        sizes = structures.layer_sizes().tolist()
        self.layer_of = structures.layer_of.tolist()
        self.layer_left = [layer_limit(n, cap, min_channels) for n in sizes]
        self.members = [[] for _ in sizes]
        for s, g in enumerate(self.layer_of):
            self.members[g].append(s)
        self.segments = [sorted(set(p.structure.tolist())) for p in structures.segments()]
        self.segment_left = [len(seg) - 1 for seg in self.segments]
        self.segments_of: list[list[int]] = [[] for _ in self.layer_of]
        for k, seg in enumerate(self.segments):
            for s in seg:
                self.segments_of[s].append(k)
        self.blocked = [self.layer_left[g] <= 0 for g in self.layer_of]
        for k, seg in enumerate(self.segments):
            if self.segment_left[k] <= 0:
                for s in seg:
                    self.blocked[s] = True

    def take(self, s: int) -> list[int]:
        """Prune `s`; returns the structures that this makes unprunable (their layer or producer hit its limit)."""
        newly = []
        self.blocked[s] = True
        g = self.layer_of[s]
        self.layer_left[g] -= 1
        if self.layer_left[g] == 0:
            newly += [t for t in self.members[g] if not self.blocked[t]]
        for k in self.segments_of[s]:
            self.segment_left[k] -= 1
            if self.segment_left[k] == 0:
                newly += [t for t in self.segments[k] if not self.blocked[t]]
        for t in newly:
            self.blocked[t] = True
        return newly


def normalizer(structures: StructureSet, normalize: str | torch.Tensor) -> torch.Tensor:
    """Per-structure divisor of the saliency: 1, the kernel size (the paper's SOSP*), the structure's MACs, or given
    costs (e.g. the seconds each structure's removal saves, measured by `layer_latency`)."""
    if isinstance(normalize, torch.Tensor):
        if normalize.shape != (structures.num_structures,) or not bool((normalize > 0).all()):
            raise AnalysisError(f"per-structure costs must be {structures.num_structures} positive numbers")
        return normalize.double().cpu()
    if normalize == "none":
        return torch.ones(structures.num_structures, dtype=torch.float64)
    if normalize == "kernel":
        return structures.kernel_sizes()
    if normalize == "macs":
        return structures.structure_macs().clamp(min=1.0)
    if normalize == "latency":
        raise AnalysisError(
            "the latency normalisation needs measured costs: pass layer_latency's structure_seconds"
        )
    raise AnalysisError(f"unknown normalisation '{normalize}'; use one of {NORMALIZATIONS}")


def order_by_saliency(
    saliency: torch.Tensor,
    structures: StructureSet,
    cap: float = 0.95,
    normalize: str | torch.Tensor = "none",
    min_channels: int = 1,
) -> tuple[torch.Tensor, int]:
    """(pruning_order, n_prunable): smallest normalised saliency first, skipping structures the budget forbids."""
    scores = saliency.double().cpu() / normalizer(structures, normalize)
    budget = Budget(structures, cap, min_channels)
    taken, skipped = [], []
    for s in torch.argsort(scores, stable=True).tolist():
        if budget.blocked[s]:
            skipped.append(s)
        else:
            budget.take(s)
            taken.append(s)
    return torch.tensor(taken + skipped, dtype=torch.long), len(taken)


def greedy_order(
    q: "torch.Tensor | MatrixRows | FactorRows",
    structures: StructureSet,
    cap: float = 0.95,
    normalize: str | torch.Tensor = "none",
    increments: list[float] | None = None,
    min_channels: int = 1,
) -> tuple[torch.Tensor, int]:
    """SOSP-I's eq. (4) in O(S^2): keep c = diag(Q) + 2 sum_{s' in M} Q[:, s'] and add 2 Q[:, s] after each choice.

    `q` is Q whole or a source of its rows (`curvature.py`); a source that forms rows in blocks is asked for the rows
    of the candidates with the smallest c at once, so the next choices find theirs formed. `increments`, if given,
    receives each choice's c[s]: how much it adds to eq. (2) of the mask so far.
    """
    source = row_source(q)
    weight = normalizer(structures, normalize).to(source.device, torch.float64)
    diagonal = source.diagonal()
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=source.device)
    budget = Budget(structures, cap, min_channels)
    c = torch.where(torch.tensor(budget.blocked, device=source.device), inf, diagonal)
    rows = _RowCache(source)
    taken = []
    for _ in range(structures.num_structures):
        scores = c / weight
        s = int(torch.argmin(scores))
        if torch.isinf(c[s]):
            break
        taken.append(s)
        if increments is not None:
            increments.append(float(c[s]))
        newly = budget.take(s) + [s]
        c += 2 * rows.row(s, scores)  # Q is symmetric: its row is its column
        c[newly] = inf
    return _with_rest(taken, diagonal.cpu() / weight.cpu()), len(taken)


class _RowCache:
    """Rows of Q a source formed ahead: on a miss, the rows of the `block` candidates with the smallest scores
    (those already held are kept, the others replaced)."""

    def __init__(self, source: "MatrixRows | FactorRows") -> None:
        self.source = source
        self.slot: dict[int, int] = {}
        self.held: torch.Tensor | None = None

    def row(self, s: int, scores: torch.Tensor) -> torch.Tensor:
        if self.source.block == 1:
            return self.source.row(s)
        if s not in self.slot:
            self._refill(s, scores)
        return self.held[self.slot.pop(s)]

    def _refill(self, s: int, scores: torch.Tensor) -> None:
        count = min(self.source.block, int(torch.isfinite(scores).sum()))
        wanted = [s] + [t for t in torch.topk(scores, count, largest=False).indices.tolist() if t != s]
        wanted = set(wanted[:count])
        kept = {t: slot for t, slot in self.slot.items() if t in wanted}
        new = [t for t in wanted if t not in kept]
        if self.held is None:
            self.held = torch.empty(
                (count, self.source.num_structures), dtype=torch.float64, device=self.source.device
            )
        free = sorted(set(range(len(self.held))) - set(kept.values()))
        formed = self.source.rows(torch.tensor(new))
        self.held[free[: len(new)]] = formed
        self.slot = {**kept, **dict(zip(new, free))}


def literal_greedy_order(
    q: torch.Tensor, structures: StructureSet, cap: float = 0.95, normalize: str = "none"
) -> tuple[torch.Tensor, int]:
    """Eq. (4) as written: at every step recompute Q[s,s] + 2 sum_{s' in M} Q[s,s'] for every candidate
    (O(S^3) overall)."""
    weight = normalizer(structures, normalize).to(q.dtype)
    budget = Budget(structures, cap)
    chosen: list[int] = []
    while True:
        candidates = [s for s in range(structures.num_structures) if not budget.blocked[s]]
        if not candidates:
            break
        cand = torch.tensor(candidates)
        increments = q[cand, cand] + 2 * (q[cand][:, chosen].sum(1) if chosen else 0)
        s = candidates[int(torch.argmin(increments / weight[cand]))]
        chosen.append(s)
        budget.take(s)
    return _with_rest(chosen, q.diagonal() / weight), len(chosen)


def _with_rest(taken: list[int], scores: torch.Tensor) -> torch.Tensor:
    """The chosen structures, then the never-prunable rest by ascending score: a permutation of all structures."""
    chosen = set(taken)
    rest = [s for s in torch.argsort(scores, stable=True).tolist() if s not in chosen]
    return torch.tensor(taken + rest, dtype=torch.long)


def prefix_for_target(
    order: torch.Tensor,
    n_prunable: int,
    structures: StructureSet,
    ratio: float,
    unit: str = "structures",
    stops: list[int] | None = None,
) -> int:
    """How many structures of the order to prune so the pruned fraction of `unit` first reaches `ratio`.

    With `stops` (a rounded order's allowed prefix lengths), the count is the first stop at or after that.
    """
    count = _prefix_for_target(order, n_prunable, structures, ratio, unit)
    if stops is None:
        return count
    return next(stop for stop in stops if stop >= count)


def _prefix_for_target(
    order: torch.Tensor, n_prunable: int, structures: StructureSet, ratio: float, unit: str
) -> int:
    if unit not in UNITS:
        raise AnalysisError(f"unknown target unit '{unit}'; use one of {UNITS}")
    if not 0 <= ratio < 1:
        raise AnalysisError(f"the pruning ratio must be in [0, 1), got {ratio}")
    if unit == "structures":
        k = math.ceil(ratio * structures.num_structures - 1e-9)
        if k > n_prunable:
            raise AnalysisError(
                f"a ratio of {ratio:.3f} of the structures is impossible with this cap: at most "
                f"{n_prunable / structures.num_structures:.3f} can be pruned"
            )
        return k
    column = 0 if unit == "params" else 1
    total = structures.counts()[column]

    def reduction(k: int) -> float:
        pruned = torch.zeros(structures.num_structures, dtype=torch.bool)
        pruned[order[:k]] = True
        return 1 - structures.counts(pruned)[column] / total

    if reduction(n_prunable) < ratio - 1e-12:
        raise AnalysisError(
            f"a {unit} reduction of {ratio:.3f} is impossible with this cap: at most "
            f"{reduction(n_prunable):.3f} can be removed"
        )
    lo, hi = 0, n_prunable
    while lo < hi:
        mid = (lo + hi) // 2
        if reduction(mid) >= ratio - 1e-12:
            hi = mid
        else:
            lo = mid + 1
    return lo


def objective_prefix(
    q: "torch.Tensor | MatrixRows | FactorRows", order: torch.Tensor, count: int
) -> torch.Tensor:
    """Eq. (2) of every prefix of `order` (sum over s, s' in the prefix of Q[s, s']), for the first `count` + 1."""
    source = row_source(q)
    c = source.diagonal().clone()
    values = [0.0]
    chosen = order[:count]
    for start in range(0, count, source.block):
        block = source.rows(chosen[start : start + source.block])
        for s, row in zip(chosen[start : start + source.block].tolist(), block):
            values.append(values[-1] + float(c[s]))
            c += 2 * row
    return torch.tensor(values, dtype=torch.float64)
