"""Attention recall: the share of the dense attention mass that the tokens a decode method reads hold,
per layer and KV head (`sparsedecode eval recall`).

Every method reads the KV cache for its output through the fused op `sparse_decode_attention`, so the
op's observer hook (`kernels.sparse_decode.record_attention_reads`) sees what any method reads without
code of its own; `method.attend` is wrapped on the instance only to know the layer. A method may call the
op more than once in a layer (lfps with attend="selected": an index pass over its candidates, then the
output pass over its top-k): the layer's last call is the one whose output the layer uses, and the one
scored.

Recall of one (decode step, sequence, layer, KV head): the mean over the group's query heads of the
dense softmax probability (fp32, the new token's query over every cached token) of the tokens read. A
full row reads everything and scores exactly 1; a list row reads the tokens of its listed units (blocks
or pages) below the sequence length. Top-k recall: the same for the heaviest units by dense mass, as
many as the row read: the ceiling of any selection that reads that many units (for lfps in candidates
mode that is its candidate count, not its kept top-k).

Prompts come from a RULER task (default niah_single_2: a magic number hidden in the essays), decoded
greedily and eagerly (`LLM(..., cuda_graphs=False)`: a graph replay runs no Python) from an on-device cache.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..kernels.reference import visible_tokens
from ..kernels.sparse_decode import record_attention_reads
from .report import (format_cell, format_length, markdown_table, safe_name, save_figure_atomic, write_bytes_atomic,
                     write_json_atomic)
from .ruler import QA_DATASETS, RULER_TASKS
from .runner import build_samples, planned_runs, prompt_batches

#: RULER tasks that need no data files; their prompts are what the methods decode
RECALL_TASKS = tuple(t for t in RULER_TASKS if t not in QA_DATASETS)
DEFAULT_TASK = "niah_single_2"
RESULTS_FILE = "recall.json"
REPORT_FILE = "recall.md"
READING_GUIDE = (
    "Recall: the share of the dense attention mass (fp32 softmax over every cached token, mean over the query "
    "heads of a KV head) held by the tokens a method read, mean over decode steps and prompts. min: the lowest "
    "(layer, KV head) cell. top-k: the same for the heaviest blocks, as many as the method read (the ceiling of "
    "any selection of that size). KV read: per decoded token."
)


@dataclass(frozen=True)
class RecallTrace:
    """One batch decoded by one method: recall and top-k recall, [steps, layers, batch, kv_heads] each."""

    recall: torch.Tensor
    topk: torch.Tensor
    generations: list[Any]


@dataclass(frozen=True)
class RecallReport:
    out_dir: Path
    files: list[Path]  # recall.json, recall.md and one heatmap per method
    results: list[dict[str, Any]]  # one row per method and length, as in recall.json
    markdown: str


def read_recall(q: torch.Tensor, k: torch.Tensor, seq_lens: torch.Tensor, scale: float, read: torch.Tensor,
                unit_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall and top-k recall [B, Hkv] of the tokens `read` [B, Hkv, T] (bool) for queries q [B, Hq, D]
    over keys k [B, Hkv, T, D]; units of `unit_size` tokens for the top-k."""
    batch, _, dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    scores = torch.einsum("bhgd,bhtd->bhgt", q.float().view(batch, kv_heads, -1, dim), k.float()) * scale
    cached = torch.arange(capacity, device=q.device) < seq_lens.long().view(-1, 1, 1)  # [B, 1, T]
    scores = scores.masked_fill(~cached[:, :, None], float("-inf"))
    lse = scores.logsumexp(-1)
    # Mass as exp(lse over the read tokens - lse over all): a full row gives the very same lse, so exactly 1.
    read_lse = scores.masked_fill(~read[:, :, None], float("-inf")).logsumexp(-1)
    recall = torch.exp(read_lse - lse).mean(-1)
    unit_mass = torch.exp(scores - lse[..., None]).mean(2).unflatten(-1, (-1, unit_size)).sum(-1)  # [B, Hkv, NU]
    read_units = read.unflatten(-1, (-1, unit_size)).any(-1).sum(-1)
    held_units = cached.unflatten(-1, (-1, unit_size)).any(-1).sum(-1)
    heaviest = F.pad(unit_mass.sort(-1, descending=True).values.cumsum(-1), (1, 0))  # [..., n]: the n heaviest
    topk = heaviest.gather(-1, read_units[..., None]).squeeze(-1).masked_fill(read_units >= held_units, 1.0)
    return recall.clamp(max=1.0), topk.clamp(max=1.0)  # rounding can overshoot 1 by an ulp


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")


def trace_recall(llm: Any, prompts: Sequence[str] | Sequence[Sequence[int]], steps: int) -> RecallTrace:
    """Decode `prompts` (one batch) greedily for `steps` steps with `llm`'s current method and score what
    it reads at every step, layer and KV head. `llm` must decode eagerly from an on-device cache."""
    _check_steps(steps)
    if llm.cuda_graphs:
        raise ValueError("attention recall needs eager decoding: construct the LLM with cuda_graphs=False")
    if getattr(llm, "kv_offload", None) is not None:
        raise ValueError("attention recall needs an on-device KV cache (an offloaded one reads a block pool)")
    method, config = llm.method, llm.config
    shape = (steps, config.num_layers, len(prompts), config.num_kv_heads)
    recall = torch.full(shape, float("nan"), device=llm.device)
    topk = torch.full(shape, float("nan"), device=llm.device)
    last: list[tuple] = []  # the layer's latest read

    def observe(q, k, v, seq_lens, scale, unit_size, unit_lists, unit_counts, full_rows) -> None:
        # The read set now, as a mask: methods rewrite their lists in place later in the layer (hand-on).
        read = visible_tokens(seq_lens, k.shape[2], unit_size, unit_lists, unit_counts, full_rows, k.shape[1])
        last[:] = [(q, k, seq_lens, scale, read, unit_size)]

    attend = method.attend

    def attend_and_score(layer: int, q: torch.Tensor, pool: Any, batch: Any) -> torch.Tensor:
        last.clear()
        out = attend(layer, q, pool, batch)
        if not last:
            raise RuntimeError(f"method {method.name!r} attended layer {layer} without sparse_decode_attention")
        row_recall, row_topk = read_recall(*last[0])
        # Row b is decode slot b (these prompts hold slots 0..n-1); a row that is not decoding has length 1,
        # and each sequence is scored at its own decode step.
        for b, (length, step) in enumerate(zip(batch.seq_lens.tolist(), batch.steps.tolist())):
            if b < len(prompts) and length > 1 and step < steps:
                recall[step, layer, b], topk[step, layer, b] = row_recall[b], row_topk[b]
        return out

    method.attend = attend_and_score
    try:
        with record_attention_reads(observe):
            generations = llm.generate(list(prompts), max_new_tokens=steps + 1, temperature=0.0, stop_token_ids=[])
    finally:
        method.attend = attend
    return RecallTrace(recall.cpu(), topk.cpu(), generations)


def recall_context(lengths: Sequence[int], steps: int) -> int:
    """The model context the diagnostic needs: the longest prompt, its first token and `steps` more."""
    return max(lengths) + steps + 1


def _summary(label: str, length: int, traces: list[RecallTrace]) -> dict[str, Any]:
    """One result row: recall per (layer, KV head), mean over steps and prompts, and its summaries."""
    recall = torch.cat([t.recall for t in traces], dim=2).mean(dim=(0, 2)).double()  # [layers, kv_heads]
    topk = torch.cat([t.topk for t in traces], dim=2).mean(dim=(0, 2)).double()
    generations = [g for t in traces for g in t.generations]

    def rounded(x: torch.Tensor) -> Any:
        return torch.round(x, decimals=6).tolist()

    return {"method": label, "length": length, "prompts": len(generations), "steps": traces[0].recall.shape[0],
            "mean": rounded(recall.mean()), "min": rounded(recall.min()), "topk_mean": rounded(topk.mean()),
            "layer_mean": rounded(recall.mean(1)),
            "kv_fraction_read": round(fmean(g.kv_fraction_read for g in generations), 6),
            "kv_bytes_per_token": round(fmean(g.kv_bytes_per_token for g in generations), 1),
            "recall": rounded(recall), "topk": rounded(topk)}


def recall_markdown(facts: dict[str, Any], labels: list[str], results: list[dict[str, Any]]) -> str:
    """A row per method and length (mean, min cell, top-k ceiling, KV read), then the mean per layer."""
    rows = [[r["method"], format_length(r["length"]), format_cell(r["mean"], 3), format_cell(r["min"], 3),
             format_cell(r["topk_mean"], 3), format_cell(r["kv_fraction_read"], 3),
             format_cell(r["kv_bytes_per_token"] / 1024, 1)]
            for r in results]
    parts = ["# Attention recall", "", " · ".join(f"{k}: {v}" for k, v in facts.items()), "",
             READING_GUIDE, "",
             markdown_table(["method", "length", "mean recall", "min (layer, head)", "top-k recall",
                              "KV fraction read", "KV KiB/token"], rows)]
    for length in sorted({r["length"] for r in results}):
        by_label = {r["method"]: r["layer_mean"] for r in results if r["length"] == length}
        layers = range(len(next(iter(by_label.values()))))
        parts += ["", f"## Mean recall per layer, {format_length(length)} (mean over KV heads)", "",
                  markdown_table(["layer", *labels],
                                 [[str(layer), *(format_cell(by_label[m][layer], 3) for m in labels)]
                                  for layer in layers])]
    return "\n".join(parts) + "\n"


def plot_recall_heatmap(results: list[dict[str, Any]], path: Path) -> None:
    """Layers x KV heads of one method, one panel per length, colour scale 0..1."""
    layers, heads = len(results[0]["recall"]), len(results[0]["recall"][0])
    figure = Figure(figsize=(1.6 + (1.0 + 0.5 * heads) * len(results), 1.5 + 0.22 * layers))
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    image = None
    for ax, row in zip(axes, results):
        image = ax.imshow(row["recall"], vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        for layer, values in enumerate(row["recall"]):
            for head, value in enumerate(values):
                ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 else "white")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(0, layers, max(1, layers // 16)))
        ax.set_xlabel("KV head")
        ax.set_title(f"{format_length(row['length'])}: mean {row['mean']:.3f}", fontsize="small")
    axes[0].set_ylabel("layer")
    figure.suptitle(results[0]["method"], fontsize="small")
    figure.colorbar(image, ax=list(axes), label="attention recall")
    save_figure_atomic(figure, path)


def run_recall(llm: Any, methods: list[tuple[str, dict[str, Any]]], lengths: list[int], samples: int, seed: int,
               batch_size: int, out_dir: Path, *, steps: int = 16, task: str = DEFAULT_TASK,
               haystack: str | Path | None = None, model_name: str | None = None,
               progress: bool = True) -> RecallReport:
    """Build `samples` prompts of `task` per length, decode each `steps` steps with every method (batches
    outside, methods inside, so a batch is prefilled once), and write `recall.json`, `recall.md` and a
    heatmap `recall_<method>.png` per method into `out_dir`."""
    runs = planned_runs(methods, lengths, samples, batch_size)
    if task not in RECALL_TASKS:
        raise ValueError(f"unknown recall task {task!r}; tasks: {', '.join(RECALL_TASKS)}")
    _check_steps(steps)  # before the prompts are built, which takes a while
    lengths = sorted(set(lengths))
    prompts, _ = build_samples("ruler", llm.tokenizer, lengths, samples, seed, tasks=[task], haystack=haystack)
    traces: dict[tuple[str, int], list[RecallTrace]] = {}
    with tqdm(total=len(prompts) * len(runs), unit="prompt", disable=not progress) as bar:
        for batch in prompt_batches(prompts, batch_size):
            for run in runs:
                llm.use_method(run.name, **run.options)
                bar.set_description(f"{run.label} {batch[0].length}")
                trace = trace_recall(llm, [s.prompt for s in batch], steps)
                traces.setdefault((run.label, batch[0].length), []).append(trace)
                bar.update(len(batch))

    labels = [run.label for run in runs]
    results = [_summary(label, length, traces[(label, length)]) for label in labels for length in lengths]
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / RESULTS_FILE, {
        "model": model_name, "task": task, "seed": seed, "samples_per_length": samples, "steps": steps,
        "lengths": lengths,
        "methods": [{"name": r.name, "options": r.options, "label": r.label} for r in runs],
        "samples": [{"length": s.length, "index": s.index, "prompt_tokens": s.prompt_tokens, "depths": s.depths}
                    for s in prompts],
        "results": results})
    facts = {"model": model_name or "-", "task": task, "seed": seed, "prompts per length": samples,
             "decode steps": steps}
    markdown = recall_markdown(facts, labels, results)
    write_bytes_atomic(out_dir / REPORT_FILE, markdown.encode("utf-8"))
    files = [out_dir / RESULTS_FILE, out_dir / REPORT_FILE]
    for label in labels:
        files.append(out_dir / f"recall_{safe_name(label)}.png")
        plot_recall_heatmap([r for r in results if r["method"] == label], files[-1])
    return RecallReport(out_dir, files, results, markdown)
