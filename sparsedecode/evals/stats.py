"""Bootstrap confidence intervals of eval scores: a method's average, and its paired difference to another
method on the same prompts.

The unit resampled is one prompt (a task, length and sample index). A suite's average is the mean of its
cells' means (a cell: one task at one length), so with `groups` the bootstrap is stratified: every resample
draws, within each cell, as many prompts as the cell holds (with replacement) and averages the cell means.
Cells keep their weight and their size, as in the average itself. The paired difference resamples the same
prompts for both methods, i.e. it bootstraps the per-prompt differences.

Percentile intervals; numpy only; seeded, so the same scores always give the same interval.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

RESAMPLES = 10_000
CONFIDENCE = 0.95
SEED = 0
MAX_DRAWS = 1 << 22  # random numbers held at once (32 MiB of int64), whatever the cell size
MULTINOMIAL_COST = 8  # a multinomial category costs about as much as this many index draws (measured)


@dataclass(frozen=True)
class Interval:
    """An estimate with its bootstrap interval, and how many values (prompts) it rests on."""
    mean: float
    low: float
    high: float
    count: int

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (e.g. x100 for percent)."""
        return Interval(self.mean * factor, self.low * factor, self.high * factor, self.count)


def bootstrap_ci(values: ArrayLike, groups: Sequence[Hashable] | None = None, *, confidence: float = CONFIDENCE,
                 resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """The mean of `values` (the mean of the group means when `groups` labels each value with its cell) and
    its percentile bootstrap interval, resampling within each group."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("give a non-empty 1-D array of values")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError("confidence must lie in (0, 1) and resamples be positive")
    cells = _cells(values, groups)
    rng = np.random.default_rng(seed)
    means = sum(_resampled_means(cell, resamples, rng) for cell in cells) / len(cells)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    estimate = float(np.mean([cell.mean() for cell in cells]))
    # the quantiles of a constant sum of floats can stray from it by an ulp; keep low <= estimate <= high
    return Interval(estimate, min(float(low), estimate), max(float(high), estimate), int(values.size))


def paired_difference_ci(a: ArrayLike, b: ArrayLike, groups: Sequence[Hashable] | None = None, *,
                         confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Mean of a - b over paired values (a[i] and b[i] are two methods on prompt i) with its interval: the
    same resampled prompts for both methods, so what the prompts share cancels out."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, groups, confidence=confidence, resamples=resamples, seed=seed)


def _cells(values: np.ndarray, groups: Sequence[Hashable] | None) -> list[np.ndarray]:
    """The values of each group, in order of first appearance (so the draws do not depend on label types)."""
    if groups is None:
        return [values]
    if len(groups) != values.size:
        raise ValueError(f"{len(groups)} group labels for {values.size} values")
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    return [values[index] for index in members.values()]


def _resampled_means(cell: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `resamples` draws of len(cell) values from `cell` with replacement.

    A draw is fully described by how often it takes each distinct value, a multinomial count. Scores take few
    distinct values (0 / 1 for most tasks), and then drawing the counts (resamples x distinct values) is
    much cheaper than drawing indices (resamples x cell size); for many distinct values, indices are.
    """
    distinct, counts = np.unique(cell, return_counts=True)
    size = cell.size
    by_counts = distinct.size * MULTINOMIAL_COST <= size
    chunk = max(1, MAX_DRAWS // (distinct.size if by_counts else size))
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        if by_counts:
            means[start:start + rows] = rng.multinomial(size, counts / size, size=rows) @ distinct / size
        else:
            means[start:start + rows] = cell[rng.integers(0, size, size=(rows, size))].mean(axis=1)
    return means
