"""SOSP-I's Q (eq. 3) kept whole (the S x S matrix) or as its R x S factor, whichever is smaller, and read row by row.

The Gauss-Newton matrix is a Gram matrix F^T F of R = N' x (rows per sample) rows. Where the factor is the smaller
(about where R < S) it is kept instead and each row of Q that the greedy selection asks for is one product
with it (Q[s, :] = 1/2 |F[:, s]^T F| + |lam1(s)| e_s), formed for a block of likely candidates at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..devices import available_memory
from ..errors import AnalysisError

FORMS = ("matrix", "factor")
ROW_BLOCK_BYTES = 256 * 2**20  # the float64 rows of Q one product with the factor forms at most


def _element(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


@dataclass(frozen=True)
class CurvatureForm:
    """How SOSP-I keeps its Gauss-Newton matrix for one analysis: `name` (matrix or factor), in `dtype`, taking
    `bytes`, and why."""

    name: str
    dtype: torch.dtype
    bytes: float
    reason: str

    def describe(self) -> str:
        kept = "the S x S matrix" if self.name == "matrix" else "its R x S factor"
        return f"Gauss-Newton matrix kept as {kept} ({self.bytes / 2**20:,.0f} MiB): {self.reason}"


def choose_form(
    s_count: int, samples: int, per_sample: int, device: torch.device, forced: str | None = None
) -> CurvatureForm:
    """The S x S matrix (float64, or float32 where only that fits) where it fits the free memory, else the factor with
    the rows of Q it forms at a time; `forced` picks one, if it fits. The matrix ranks faster wherever it fits: its
    Gram is one product and a greedy step reads one row, while the factor forms rows of Q again at every miss (2.3x
    slower on ViT-B/16, `docs/benchmarks.md`); the factor is for the nets whose matrix does not fit.

    R = `samples` x `per_sample` rows over S = `s_count` structures. Fails before any work, naming both sizes, the
    free memory and what to change, where neither fits."""
    if forced is not None and forced not in FORMS:
        raise AnalysisError(f"unknown form '{forced}' of the Gauss-Newton matrix; use one of {FORMS}")
    rows = samples * per_sample
    free = 0.8 * available_memory(device) - ROW_BLOCK_BYTES
    sizes = f"R = {rows:,} rows (N' = {samples:,} x {per_sample:,}) over S = {s_count:,} structures"
    fitting = [
        CurvatureForm("matrix", dtype, s_count * s_count * _element(dtype), "")
        for dtype in (torch.float64, torch.float32)
        if s_count * s_count * _element(dtype) <= free
    ][:1]
    factor = factor_bytes(rows, s_count)
    if factor <= free:
        fitting.append(CurvatureForm("factor", torch.float32, factor, ""))
    chosen = (
        [f for f in fitting if f.name == forced] if forced else fitting
    )  # the matrix first, where it fits
    if not chosen:
        need = s_count * s_count * 4 if forced == "matrix" else factor
        what = "S x S matrix" if forced == "matrix" else f"R x S factor ({sizes})"
        advice = (
            ""
            if forced == "matrix"
            else " Fewer samples (--samples) or sampled labels (--mc-labels K) shorten R."
        )
        raise AnalysisError(_refusal(s_count, need, what, device) + advice)
    form = chosen[0]
    if forced:
        why = f"asked for; {sizes}"
    elif form.name == "matrix":
        why = f"{sizes}: the matrix fits the free memory and ranks fastest (the factor would take " + (
            f"{factor / 2**20:,.0f} MiB, but forms rows of Q again at every greedy step it misses)"
        )
    else:
        why = (
            f"{sizes}: the S x S matrix would take {s_count * s_count * 4 / 2**20:,.0f} MiB even in float32, "
            + (f"more than the {max(free, 0) / 2**20:,.0f} MiB free")
        )
    return CurvatureForm(form.name, form.dtype, form.bytes, why)


def factor_rows_block(s_count: int) -> int:
    """Rows of Q one product with the factor forms: at most ROW_BLOCK_BYTES in float64 and an eighth of S."""
    return max(1, min(-(-s_count // 8), ROW_BLOCK_BYTES // max(8 * s_count, 1)))


def factor_bytes(rows: int, s_count: int) -> float:
    """The factor's memory (float32), with a block of Q's rows as formed (float32), widened and held (float64)."""
    return rows * s_count * _element(torch.float32) + 20 * factor_rows_block(s_count) * s_count


def _refusal(s_count: int, need: float, what: str, device: torch.device) -> str:
    return (
        f"SOSP-I needs its Gauss-Newton matrix over S = {s_count:,} structures as the {what}: "
        f"{need / 2**30:.1f} GiB, but only {available_memory(device) / 2**30:.1f} GiB is free on {device}. Use "
        "SOSP-H (no such matrix), exclude layers (--exclude), or run on a machine with more memory."
    )


class MatrixRows:
    """Q formed whole: each row is read from it."""

    block = 1

    def __init__(self, q: torch.Tensor) -> None:
        self.q = q
        self.num_structures = q.shape[0]
        self.device = q.device

    def diagonal(self) -> torch.Tensor:
        return self.q.diagonal().to(torch.float64)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.q[index]

    def row(self, s: int) -> torch.Tensor:
        return self.q[s]  # a view: no copy of S numbers per greedy step


class FactorRows:
    """Q read from lam1 and the factor F (R, S) of the Gauss-Newton matrix: a block of rows is one product with F."""

    def __init__(self, first: torch.Tensor, factor: torch.Tensor) -> None:
        self.factor = factor
        self.first = first.abs().to(torch.float64)
        self.num_structures = factor.shape[1]
        self.device = factor.device
        self.block = factor_rows_block(self.num_structures)

    @cached_property
    def gram_diagonal(self) -> torch.Tensor:
        """theta_s^T H_GN theta_s for every s, summed in float64 (read by the saliency and by the selection)."""
        squares = torch.zeros(self.num_structures, dtype=torch.float64, device=self.device)
        for start in range(0, self.num_structures, self.block):
            part = self.factor[:, start : start + self.block].to(torch.float64)
            squares[start : start + self.block] = (part * part).sum(0)
        return squares

    def diagonal(self) -> torch.Tensor:
        return 0.5 * self.gram_diagonal + self.first

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        index = index.to(self.device)
        block = (self.factor[:, index].T @ self.factor).to(torch.float64).abs_().mul_(0.5)
        block[torch.arange(len(index), device=self.device), index] += self.first[index]
        return block

    def row(self, s: int) -> torch.Tensor:
        return self.rows(torch.tensor([s]))[0]


def row_source(q: "torch.Tensor | MatrixRows | FactorRows") -> "MatrixRows | FactorRows":
    """Q's rows, whether Q is given whole or already as a row source."""
    return MatrixRows(q) if isinstance(q, torch.Tensor) else q
