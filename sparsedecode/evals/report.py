"""Results on disk: atomic JSON / markdown / PNG writes, the score table with its intervals, and the plots."""
from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from statistics import fmean
from typing import Any

from matplotlib.figure import Figure

from sparsedecode.utils.files import atomic_write_bytes, atomic_write_text
from sparsedecode.utils.markdown import markdown_table

from .needle import NEEDLE_TASK, needle_matrix
from .records import prompt_key
from .stats import CONFIDENCE, RESAMPLES, SEED, Interval, bootstrap_ci, paired_difference_ci

BASELINE = "dense"  # the method every other one is compared with, prompt by prompt
write_bytes_atomic = atomic_write_bytes  # the name the attention-recall report imports
STATISTICS_NOTE = (
    f"Intervals: {CONFIDENCE:.0%} percentile bootstrap, {RESAMPLES:,} resamples (seed {SEED}), over prompts, "
    "stratified by task and length: each resample redraws, within every task x length cell, as many prompts as "
    "the cell holds, with replacement, and averages the cell means, as the Average row does. The difference to "
    f"{BASELINE} is paired: it resamples the prompts both methods decoded, the same ones for both."
)


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False))


def save_figure_atomic(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def format_length(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return fmean(values) if values else None


def score_table(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Mean score in % per (task, length) row and method, rows in the order the records first name them."""
    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in records:
        cells.setdefault((r["task"], r["length"]), {}).setdefault(r["method"], []).append(r["score"])
    return {row: {m: 100 * fmean(scores) for m, scores in by_method.items()} for row, by_method in cells.items()}


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The score table as JSON rows: task, length, method, score (%), samples."""
    counts: dict[tuple[str, int, str], int] = {}
    for r in records:
        key = (r["task"], r["length"], r["method"])
        counts[key] = counts.get(key, 0) + 1
    return [{"task": task, "length": length, "method": method, "score": round(score, 2),
             "samples": counts[(task, length, method)]}
            for (task, length), by_method in score_table(records).items() for method, score in by_method.items()]


def _interval(interval: Interval) -> dict[str, Any]:
    def rounded(value: float) -> float:
        return round(value, 2) + 0.0  # + 0.0: no "-0.0" in the tables

    return {"mean": rounded(interval.mean), "low": rounded(interval.low), "high": rounded(interval.high),
            "prompts": interval.count}


def _cell(record: dict[str, Any]) -> tuple[str, int]:
    """The stratum of the bootstrap: a cell of the score table."""
    return record["task"], record["length"]


def method_statistics(records: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per method: its average score (%) with its interval and, for each method but the baseline, the paired
    difference to the baseline (method - baseline, points) over the prompts both decoded (see STATISTICS_NOTE)."""
    by_method: dict[str, dict[tuple, dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[prompt_key(r)] = r
    baseline = by_method.get(BASELINE, {})
    rows = []
    for method in methods:
        mine = list(by_method.get(method, {}).values())
        if not mine:
            continue
        average = bootstrap_ci([r["score"] for r in mine], [_cell(r) for r in mine])
        row = {"method": method, **_interval(average.scaled(100))}
        paired = [(r, baseline[prompt_key(r)]) for r in mine if prompt_key(r) in baseline]
        if method != BASELINE and paired:
            difference = paired_difference_ci([r["score"] for r, _ in paired], [b["score"] for _, b in paired],
                                              [_cell(r) for r, _ in paired])
            row.update(versus=BASELINE, difference=_interval(difference.scaled(100)))
        rows.append(row)
    return rows


def statistics_table(rows: list[dict[str, Any]]) -> str:
    """`method_statistics` rows as markdown: average [interval] and difference to the baseline [interval]."""
    def interval(values: dict[str, Any], signed: bool = False) -> list[str]:
        sign = "+" if signed else ""
        return [f"{values['mean']:{sign}.1f}", f"[{values['low']:{sign}.1f}, {values['high']:{sign}.1f}]",
                str(values["prompts"])]

    body = [[row["method"], *interval(row),
             *(interval(row["difference"], signed=True) if "difference" in row else ["", "", ""])] for row in rows]
    confidence = f"{CONFIDENCE:.0%}"
    return markdown_table(["method", "average", f"{confidence} interval", "prompts", f"vs {BASELINE}",
                           f"{confidence} interval", "paired prompts"], body)


def _sorted_rows(table: dict[tuple[str, int], dict[str, float]], task_order: list[str]) -> list[tuple[str, int]]:
    rank = {task: i for i, task in enumerate(task_order)}
    return sorted(table, key=lambda row: (rank.get(row[0], len(rank)), row[1]))


def format_cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown_report(title: str, facts: dict[str, Any], methods: list[str], task_order: list[str],
                    records: list[dict[str, Any]], skipped: dict[str, str], statistics: list[dict[str, Any]]) -> str:
    """Methods side by side: one row per task and length, an Average row, the averages with their intervals
    (`method_statistics` rows), then speed and KV read per method."""
    table = score_table(records)
    rows = _sorted_rows(table, task_order)
    body = [[task, format_length(length), *(format_cell(table[(task, length)].get(m)) for m in methods)]
            for task, length in rows]
    body.append(["**Average**", "", *(format_cell(_mean(table[row].get(m) for row in rows)) for m in methods)])
    parts = [f"# {title}", "", " · ".join(f"{k}: {v}" for k, v in facts.items()), "",
             "Scores in % (RULER string match; exact final number for reasoning).", "",
             markdown_table(["task", "length", *methods], body),
             "", f"## Averages with {CONFIDENCE:.0%} intervals", "", STATISTICS_NOTE, "", statistics_table(statistics)]
    if skipped:
        parts += ["", "Skipped:", *(f"- {task}: {reason}" for task, reason in skipped.items())]
    if any(r["task"] == NEEDLE_TASK for r in records):
        for method in methods:
            depths, lengths, grid = needle_matrix(records, method)
            parts += ["", f"## Needle: {method} (rows: depth, columns: length)", "",
                      markdown_table(["depth", *map(format_length, lengths)],
                                      [[f"{d:.2f}", *map(format_cell, row)] for d, row in zip(depths, grid)])]
    parts += ["", "## Speed and KV read (means per generation)", "",
              markdown_table(["method", "prompt tokens", "output tokens", "prefill s", "decode tok/s",
                               "KV fraction read"], [_speed_row(records, m) for m in methods])]
    return "\n".join(parts) + "\n"


def _speed_row(records: list[dict[str, Any]], method: str) -> list[str]:
    mine = [r for r in records if r["method"] == method]

    def mean_of(field: str) -> float | None:
        return _mean(r[field] for r in mine)

    return [method, format_cell(mean_of("prompt_tokens"), 0), format_cell(mean_of("output_tokens"), 0),
            format_cell(mean_of("prefill_seconds"), 3), format_cell(mean_of("decode_tokens_per_s"), 1),
            format_cell(mean_of("kv_fraction_read"), 3)]


def plot_accuracy_vs_length(records: list[dict[str, Any]], methods: list[str], path: Path,
                            x_label: str = "prompt length (tokens)") -> None:
    """One line per method: the mean score over tasks at each length."""
    table = score_table(records)
    lengths = sorted({length for _, length in table})
    figure = Figure(figsize=(6.4, 4.2))
    ax = figure.subplots()
    for method in methods:
        ys = [_mean(scores.get(method) for (_, n), scores in table.items() if n == length) for length in lengths]
        ax.plot(lengths, [float("nan") if y is None else y for y in ys], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_length(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-2, 102)
    ax.set_xlabel(x_label)
    ax.set_ylabel("score (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure_atomic(figure, path)


def plot_needle_heatmaps(records: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    """One depth x length heatmap per method, side by side, on one colour scale."""
    figure = Figure(figsize=(4.2 * len(methods) + 1.2, 4.2))
    axes = figure.subplots(1, len(methods), squeeze=False)[0]
    image = None
    for ax, method in zip(axes, methods):
        depths, lengths, grid = needle_matrix(records, method)
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, format_cell(value, 0), ha="center", va="center", fontsize=7)
        ax.set_title(method, fontsize="small")
        ax.set_xlabel("length (tokens)")
    axes[0].set_ylabel("needle depth")
    if image is not None:
        figure.colorbar(image, ax=list(axes), label="score (%)")
    save_figure_atomic(figure, path)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"
