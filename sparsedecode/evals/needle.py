"""The needle grid: one magic number hidden in the essays at each depth of a grid, at each length."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .ruler import NIAH_SPECS, niah_task
from .samples import EvalResources, Sample, generate_samples

NEEDLE_TASK = "needle"
NEEDLE_SPEC = NIAH_SPECS["niah_single_2"]  # "One of the special magic numbers for <key> is: <7 digits>." in essays
DEFAULT_DEPTHS: tuple[float, ...] = tuple(i / 10 for i in range(11))


def needle_samples(resources: EvalResources, lengths: list[int], depths: Sequence[float], count: int,
                   seed: int) -> list[Sample]:
    """`count` samples per (depth, length) cell; sample i has the same key and number in every cell."""
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"needle depths must lie in [0, 1], got {bad}")
    samples = []
    for depth in depths:
        task = niah_task(NEEDLE_TASK, replace(NEEDLE_SPEC, depths=(depth,)))
        for length in lengths:
            samples.extend(generate_samples(task, resources, length, count, seed))
    return samples


def needle_matrix(records: list[dict[str, Any]], method: str) -> tuple[list[float], list[int], list[list[float]]]:
    """Mean score in % of `method` per cell: (depths, lengths, rows[depth][length])."""
    cells: dict[tuple[float, int], list[float]] = {}
    for r in records:
        if r["method"] == method and r["task"] == NEEDLE_TASK:
            cells.setdefault((r["depths"][0], r["length"]), []).append(r["score"])
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    rows = [[100 * sum(s) / len(s) if (s := cells.get((d, n))) else float("nan") for n in lengths] for d in depths]
    return depths, lengths, rows
