"""Helpers shared by the benchmarks: timing, copy bandwidth, markdown tables, plots, atomic writes.

Conventions: times are seconds; a bandwidth counts the bytes read plus the bytes written per second
(a copy of N bytes moves 2N), as in the physical-limit section of the project reference; a *floor*
is the bytes a step must read divided by that bandwidth.
"""
from __future__ import annotations

import gc
import io
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.haystack import haystack_text
from ..utils import markdown
from ..utils.files import atomic_write_bytes

if TYPE_CHECKING:
    from ..methods import DecodeMethod

COPY_BYTES_CUDA = 2 << 30  # far beyond any L2, so the copy streams from device memory
COPY_BYTES_CPU = 64 << 20


@dataclass(frozen=True)
class Timing:
    """Per-call times of one measurement, in seconds."""

    median: float
    p10: float
    p90: float
    mean: float
    calls: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        s = np.asarray(seconds, dtype=np.float64)
        p10, median, p90 = np.percentile(s, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), float(s.mean()), len(s))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def median_time(
    fn: Callable[[], Any],
    repeats: int = 50,
    warmup: int = 5,
    device: torch.device | str | None = None,
    flush_l2: bool = False,
) -> Timing:
    """Time `repeats` calls of `fn` one by one after `warmup` untimed calls. On CUDA each call sits
    between two CUDA events (device time, no host sync inside the loop); elsewhere the wall clock.
    `flush_l2` overwrites a buffer twice the L2 size before each call, outside the timed region,
    so a small kernel input is read from device memory as it would be inside a model."""
    return Timing.of(_call_times([fn], repeats, warmup, device, flush_l2)[0])


def paired_difference(
    long: Callable[[], Any],
    short: Callable[[], Any],
    repeats: int = 50,
    warmup: int = 5,
    device: torch.device | str | None = None,
) -> Timing:
    """What `long` takes beyond `short`: the two are called alternately, timed as `median_time` times a
    call, and each pair gives one difference. Costs both calls share (loading inputs, a host sync at the
    end) cancel out."""
    long_times, short_times = _call_times([long, short], repeats, warmup, device)
    return Timing.of([a - b for a, b in zip(long_times, short_times)])


def _call_times(fns: Sequence[Callable[[], Any]], repeats: int, warmup: int, device: torch.device | str | None,
                flush_l2: bool = False) -> list[list[float]]:
    """Seconds of each call of each of `fns`, called in turn `repeats` times after `warmup` untimed rounds."""
    device = torch.device(device) if device is not None else _current_device()
    for _ in range(warmup):
        for fn in fns:
            fn()
    if device.type != "cuda":
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(repeats):
            for fn, out in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return times
    flush = None
    if flush_l2:
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        flush = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in fns]
              for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for round_events in events:
        for fn, (start, end) in zip(fns, round_events):
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize(device)
    return [[r[i][0].elapsed_time(r[i][1]) / 1e3 for r in events] for i in range(len(fns))]


def kernel_times(fn: Callable[[], Any], steps: int = 10) -> list[tuple[str, float]]:
    """Device seconds per call of `fn` spent in each kernel (by name, most first), from the PyTorch
    profiler over `steps` calls after one untimed call; kernels replayed from CUDA graphs included."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    return [(e.key, e.device_time_total / 1e6 / steps) for e in sorted(events, key=lambda e: -e.device_time_total)]


def step_kinds(method: DecodeMethod, seq_len: int, steps: int) -> list[int]:
    """For decode steps 0 .. steps - 1 of a sequence of `seq_len` tokens, the first step of each one's kind:
    steps that read the same KV rows (`kv_tokens_read`) are one kind, e.g. lfps's exact refresh every
    16th step and the predicted steps between. A kind is timed at its first step."""
    first: dict[float, int] = {}
    return [first.setdefault(method.kv_tokens_read(seq_len, s), s) for s in range(steps)]


def prompts(tokenizer: Any, vocab_size: int, length: int, count: int, haystack: str | Path | None = None,
            seed: int = 0) -> list[list[int]]:
    """`count` distinct prompts of `length` token ids: random ids for a model without tokenizer (random
    weights); otherwise rotations of the haystack text's tokens (the essays by default), starting evenly
    spaced over it and wrapping around."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(1, vocab_size, (count, length), generator=generator).tolist()
    text = haystack_text(haystack)[: 8 * length]  # tokens are ~4 characters: do not tokenise all of it
    ids = np.asarray(tokenizer(text, add_special_tokens=False).input_ids)
    starts = np.arange(count) * len(ids) // count
    return np.take(ids, (starts[:, None] + np.arange(length)) % len(ids)).tolist()


def _current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def release_memory() -> None:
    """Give back the GPU (and pinned) memory of models and engines no longer referenced, before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    """The GPU's name, or "CPU (<machine>)"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device | str, nbytes: int | None = None, repeats: int = 20) -> float:
    """Device-memory bandwidth in bytes/s, read + write: a large buffer copied into another."""
    device = torch.device(device)
    nbytes = nbytes or (COPY_BYTES_CUDA if device.type == "cuda" else COPY_BYTES_CPU)
    src = torch.randint(1, 255, (nbytes,), dtype=torch.uint8, device=device)  # not zeros: no compressed fast path
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), repeats=repeats, warmup=3, device=device).median
    return 2 * nbytes / seconds


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `rows` (dicts); `columns` picks and orders the keys (default: the
    first row's). Floats get 3 significant digits (no decimals from 100 up), None an empty cell."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    return markdown.markdown_table(columns, [[format_cell(row.get(c)) for c in columns] for row in rows], align="---")


def format_cell(value: Any) -> str:
    """A table cell: floats to 3 significant digits without exponents, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def _panels(rows: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def _colours(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """One colour per method, in order of first appearance, the same in every plot of a run."""
    methods = dict.fromkeys(r["method"] for r in rows)
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def _tokens(value: float, _position: Any = None) -> str:
    return f"{value / 1024:g}K" if value >= 1024 else f"{value:g}"


def _save_figure(fig: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())


def plot_speedup_vs_context(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    panels: Sequence[str] = ("model", "batch"),
    speedup: str = "speedup",
    ceiling: str | None = "ceiling",
    title: str = "speedup over dense",
) -> None:
    """One panel per distinct `panels` value; per method a line of `speedup` against `context`
    (log scale) and, if given, its `ceiling` dashed in the same colour."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.ticker import FuncFormatter

    groups = _panels(rows, panels)
    cols = min(3, len(groups)) or 1
    nrows = -(-len(groups) // cols) or 1
    fig = Figure(figsize=(5 * cols, 3.6 * nrows), layout="constrained")
    colours = _colours(rows)
    for i, (key, group) in enumerate(groups.items()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for (method,), series in _panels(group, ["method"]).items():
            series = sorted((r for r in series if r.get(speedup) is not None), key=lambda r: r["context"])
            if not series:
                continue
            x = [r["context"] for r in series]
            colour = colours[method]
            ax.plot(x, [r[speedup] for r in series], "o-", color=colour, label=method)
            if ceiling:
                ax.plot(x, [r[ceiling] for r in series], "--", color=colour, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panels, key, strict=True)), fontsize=9)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(speedup + (" (dashed: ceiling)" if ceiling else ""))
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_time_vs_floor(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    time_key: str = "ms",
    floor_key: str = "floor_ms",
    title: str = "measured time against the bytes floor",
) -> None:
    """Log-log scatter of measured `time_key` against `floor_key`, one colour per method; the diagonal is
    time = floor, so the vertical distance to it is the headroom left."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    points = [r for r in rows if r.get(time_key) is not None and r.get(floor_key) is not None]
    colours = _colours(rows)
    for (method,), series in _panels(points, ["method"]).items():
        ax.scatter([r[floor_key] for r in series], [r[time_key] for r in series], s=18, color=colours[method],
                   label=method)
    if points:
        lo = min(min(r[floor_key], r[time_key]) for r in points)
        hi = max(max(r[floor_key], r[time_key]) for r in points)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers: the range is narrow, powers of ten read badly
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(f"{floor_key} (bytes read / copy bandwidth)")
    ax.set_ylabel(f"measured {time_key}")
    ax.legend(fontsize=7)
    ax.set_title(title)
    _save_figure(fig, path)
