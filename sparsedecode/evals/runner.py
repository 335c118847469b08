"""Run a quality suite over several decode methods of one model and write the results."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .needle import DEFAULT_DEPTHS, needle_samples
from .reasoning import reasoning_samples
from .report import (markdown_report, plot_accuracy_vs_length, plot_needle_heatmaps, summary_rows,
                     write_bytes_atomic, write_json_atomic)
from .ruler import NIAH_NEW_TOKENS, RULER_TASKS, load_qa_sets, ruler_samples
from .samples import EvalResources, Sample
from .scoring import score

SUITES = ("ruler", "needle", "reasoning")
CHECKPOINT_SECONDS = 30.0  # results.json is rewritten at most this often within a method (and after each one)
REASONING_PROMPT_ALLOWANCE = 1024  # tokens of a reasoning prompt (its length is the generation budget)

SAMPLES_FILE = "samples.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"
ACCURACY_PLOT = "accuracy_vs_length.png"
NEEDLE_PLOT = "needle_heatmap.png"


@dataclass(frozen=True)
class MethodRun:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"


@dataclass(frozen=True)
class EvalReport:
    out_dir: Path
    files: list[Path]  # samples.json, results.json, results.md and the plots
    summary: list[dict[str, Any]]  # rows: task, length, method, score (%), samples
    skipped: dict[str, str]  # task -> why it did not run
    markdown: str


def context_needed(suite: str, lengths: Sequence[int]) -> int:
    """The model context a suite needs at these lengths: the longest prompt plus its answer."""
    if suite == "reasoning":
        return max(lengths) + REASONING_PROMPT_ALLOWANCE
    longest_answer = max(t.max_new_tokens for t in RULER_TASKS.values()) if suite == "ruler" else NIAH_NEW_TOKENS
    return max(lengths) + longest_answer


def build_samples(suite: str, tokenizer: Any, lengths: list[int], samples: int, seed: int, *,
                  tasks: list[str] | None = None, squad: str | Path | None = None,
                  hotpotqa: str | Path | None = None, haystack: str | Path | None = None,
                  depths: Sequence[float] | None = None,
                  problems: str | Path | None = None) -> tuple[list[Sample], dict[str, str]]:
    """The prompts of a suite, determined by the seed and the tokenizer; and the tasks skipped, with why."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    resources = EvalResources(tokenizer, haystack, load_qa_sets(squad, hotpotqa))
    if suite == "ruler":
        return ruler_samples(resources, lengths, samples, seed, tasks)
    if suite == "needle":
        return needle_samples(resources, lengths, depths or DEFAULT_DEPTHS, samples, seed), {}
    return reasoning_samples(resources, lengths, samples, seed, problems), {}


def planned_runs(methods: list[tuple[str, dict[str, Any]]], lengths: Sequence[int], samples: int,
                 batch_size: int) -> list[MethodRun]:
    """The runs of (method, options) pairs, after checking the sizes of a run over prompts."""
    runs = [MethodRun(name, dict(options)) for name, options in methods]
    labels = [run.label for run in runs]
    if not runs or len(set(labels)) != len(labels):
        raise ValueError(f"give at least one method, each name and options once (got {labels})")
    if samples < 1 or batch_size < 1 or not lengths or min(lengths) < 1:
        raise ValueError("samples, batch_size and every length must be positive, with at least one length")
    return runs


def prompt_batches(samples: list[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Batches of one length (similar prompt lengths; tasks mixed, each sample decoding to its own
    max_new_tokens), shortest first."""
    ordered = sorted(samples, key=lambda s: s.length)  # stable: tasks keep their order within a length
    for _, group in groupby(ordered, key=lambda s: s.length):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def _record(sample: Sample, method: str, generation: Any) -> dict[str, Any]:
    return {
        "task": sample.task, "length": sample.length, "index": sample.index, "depths": sample.depths,
        "method": method, "prediction": generation.text,
        "score": score(sample.metric, generation.text, sample.references), "references": sample.references,
        "prompt_tokens": generation.prompt_tokens, "output_tokens": len(generation.token_ids),
        "prefill_seconds": generation.prefill_seconds, "decode_tokens_per_s": generation.decode_tokens_per_s,
        "kv_fraction_read": generation.kv_fraction_read,
    }


def run_eval(llm: Any, suite: str, methods: list[tuple[str, dict[str, Any]]], lengths: list[int], samples: int,
             seed: int, batch_size: int, out_dir: Path, *, tasks: list[str] | None = None,
             squad: str | Path | None = None, hotpotqa: str | Path | None = None,
             haystack: str | Path | None = None, depths: Sequence[float] | None = None,
             problems: str | Path | None = None, model_name: str | None = None,
             progress: bool = True) -> EvalReport:
    """Generate the suite's prompts once, run every method on them in batches (greedy), and write
    `samples.json` (prompts, references, depths), `results.json` (one record per sample and method, plus a
    summary), `results.md` (methods side by side) and the plots into `out_dir`.

    For the reasoning suite `lengths` are generation budgets (max new tokens); otherwise prompt lengths.
    Every file is replaced atomically; results.json is checkpointed during the run (`"complete": false`).
    """
    runs = planned_runs(methods, lengths, samples, batch_size)
    labels = [run.label for run in runs]
    prompts, skipped = build_samples(suite, llm.tokenizer, sorted(set(lengths)), samples, seed, tasks=tasks,
                                     squad=squad, hotpotqa=hotpotqa, haystack=haystack, depths=depths,
                                     problems=problems)
    if not prompts:
        raise ValueError("no task left to run; skipped: "
                         + "; ".join(f"{task}: {reason}" for task, reason in skipped.items()))
    out_dir = Path(out_dir)
    header = {"suite": suite, "model": model_name, "seed": seed, "samples_per_cell": samples,
              "lengths": sorted(set(lengths)), "methods": [{"name": r.name, "options": r.options, "label": r.label}
                                                           for r in runs], "skipped": skipped}
    write_json_atomic(out_dir / SAMPLES_FILE, {**header, "samples": [asdict(s) for s in prompts]})

    records: list[dict[str, Any]] = []
    results_path = out_dir / RESULTS_FILE
    last_checkpoint = time.monotonic()

    def checkpoint() -> None:
        nonlocal last_checkpoint
        write_json_atomic(results_path, {**header, "complete": False, "records": records})
        last_checkpoint = time.monotonic()

    with tqdm(total=len(prompts) * len(runs), unit="prompt", disable=not progress) as bar:
        # Batches outside, methods inside: the engine reuses a batch's prefill for every method.
        for batch in prompt_batches(prompts, batch_size):
            for run in runs:
                llm.use_method(run.name, **run.options)
                bar.set_description(f"{run.label} {batch[0].task} {batch[0].length}")
                generations = llm.generate([s.prompt for s in batch], temperature=0.0, seed=seed,
                                           max_new_tokens=[s.max_new_tokens for s in batch])
                records.extend(_record(s, run.label, g) for s, g in zip(batch, generations))
                bar.update(len(batch))
            if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                checkpoint()

    summary = summary_rows(records)
    write_json_atomic(results_path, {**header, "complete": True, "summary": summary, "records": records})
    task_order = list(dict.fromkeys(s.task for s in prompts))
    facts = {"model": model_name or "-", "seed": seed, "samples per cell": samples}
    markdown = markdown_report(f"{suite} results", facts, labels, task_order, records, skipped)
    write_bytes_atomic(out_dir / REPORT_FILE, markdown.encode("utf-8"))
    files = [out_dir / SAMPLES_FILE, results_path, out_dir / REPORT_FILE, out_dir / ACCURACY_PLOT]
    x_label = "generation budget (max new tokens)" if suite == "reasoning" else "prompt length (tokens)"
    plot_accuracy_vs_length(records, labels, out_dir / ACCURACY_PLOT, x_label)
    if suite == "needle":
        plot_needle_heatmaps(records, labels, out_dir / NEEDLE_PLOT)
        files.append(out_dir / NEEDLE_PLOT)
    return EvalReport(out_dir, files, summary, skipped, markdown)
