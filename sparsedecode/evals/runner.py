"""Run a quality suite over several decode methods of one model and write the results; resume a run and merge
the results of several runs (`results.py`)."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sparsedecode.methods import make_method

from .needle import DEFAULT_DEPTHS, needle_samples
from .reasoning import reasoning_samples
from .records import make_record, sample_entry, sample_key
from .results import (SAMPLES_FILE, EvalReport, add_prompts_to_folder, merge_folders, open_results, write_checkpoint,
                      write_results, write_samples)
from .ruler import NIAH_NEW_TOKENS, RULER_TASKS, load_qa_sets, ruler_samples
from .samples import EvalResources, Sample

SUITES = ("ruler", "needle", "reasoning")
CHECKPOINT_SECONDS = 30.0  # results.json is rewritten at most this often during a run (and when it stops)
REASONING_PROMPT_ALLOWANCE = 1024  # tokens of a reasoning prompt (its length is the generation budget)


@dataclass(frozen=True)
class MethodRun:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"


def context_needed(suite: str, lengths: Sequence[int], problems_per_prompt: int = 1) -> int:
    """The model context a suite needs at these lengths: the longest prompt plus its answer."""
    if suite == "reasoning":
        return max(lengths) + REASONING_PROMPT_ALLOWANCE * problems_per_prompt
    longest_answer = max(t.max_new_tokens for t in RULER_TASKS.values()) if suite == "ruler" else NIAH_NEW_TOKENS
    return max(lengths) + longest_answer


def build_samples(suite: str, tokenizer: Any, lengths: list[int], samples: int, seed: int, *,
                  tasks: list[str] | None = None, squad: str | Path | None = None,
                  hotpotqa: str | Path | None = None, haystack: str | Path | None = None,
                  depths: Sequence[float] | None = None,
                  problems: str | Path | None = None,
                  problems_per_prompt: int = 1) -> tuple[list[Sample], dict[str, str]]:
    """The prompts of a suite, determined by the seed and the tokenizer; and the tasks skipped, with why."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    resources = EvalResources(tokenizer, haystack, load_qa_sets(squad, hotpotqa))
    if suite == "ruler":
        return ruler_samples(resources, lengths, samples, seed, tasks)
    if suite == "needle":
        return needle_samples(resources, lengths, depths or DEFAULT_DEPTHS, samples, seed), {}
    return reasoning_samples(resources, lengths, samples, seed, problems, problems_per_prompt), {}


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


def method_entry(config: Any, run: MethodRun) -> dict[str, Any]:
    """A method run as results.json lists it, with the fingerprint of the head roles it resolves to on this
    model (methods with roles; `config` None: not known): resuming a folder under the same label with other
    roles is refused."""
    roles = None if config is None else getattr(make_method(run.name, config, **run.options), "roles", None)
    entry = {"name": run.name, "options": run.options, "label": run.label}
    return entry if roles is None else {**entry, "roles": roles.fingerprint()}


def run_eval(llm: Any, suite: str, methods: list[tuple[str, dict[str, Any]]], lengths: list[int], samples: int,
             seed: int, batch_size: int, out_dir: Path, *, tasks: list[str] | None = None,
             squad: str | Path | None = None, hotpotqa: str | Path | None = None,
             haystack: str | Path | None = None, depths: Sequence[float] | None = None,
             problems: str | Path | None = None, problems_per_prompt: int = 1, model_name: str | None = None,
             progress: bool = True) -> EvalReport:
    """Generate the suite's prompts once, run every method on them in batches (greedy), and write
    `samples.json` (prompts, references, depths), `results.json` (one record per sample and method, a summary
    and the averages with their intervals), `results.md` (methods side by side) and the plots into `out_dir`.

    For the reasoning suite `lengths` are generation budgets (max new tokens); otherwise prompt lengths.
    A folder that already holds results of the same suite, model and seed is resumed: the (method run, prompt)
    records it has are kept, not generated again, and the new ones are added (other settings are refused).
    Every file is replaced atomically; results.json is checkpointed during the run and when it stops
    (`"complete": false`), so an interrupted run loses at most CHECKPOINT_SECONDS of work.
    """
    runs = planned_runs(methods, lengths, samples, batch_size)
    prompts, skipped = build_samples(suite, llm.tokenizer, sorted(set(lengths)), samples, seed, tasks=tasks,
                                     squad=squad, hotpotqa=hotpotqa, haystack=haystack, depths=depths,
                                     problems=problems, problems_per_prompt=problems_per_prompt)
    if not prompts:
        raise ValueError("no task left to run; skipped: "
                         + "; ".join(f"{task}: {reason}" for task, reason in skipped.items()))
    out_dir = Path(out_dir)
    results = open_results(out_dir, {"suite": suite, "model": model_name, "seed": seed})
    this_run = f"this run into {out_dir}"
    results.add_samples([sample_entry(s) for s in prompts], this_run)
    results.add_methods([method_entry(getattr(llm, "config", None), r) for r in runs], this_run)
    results.skipped.update(skipped)
    write_samples(out_dir, results)

    def missing(batch: list[Sample], run: MethodRun) -> list[Sample]:
        return [s for s in batch if not results.has(run.label, sample_key(s))]

    todo = [s for s in prompts if any(not results.has(run.label, sample_key(s)) for run in runs)]
    generations_left = sum(len(missing(todo, run)) for run in runs)
    done_before = len(prompts) * len(runs) - generations_left
    last_checkpoint = time.monotonic()
    try:
        with tqdm(total=generations_left, unit="prompt", disable=not progress) as bar:
            # Batches outside, methods inside: the engine reuses a batch's prefill for every method.
            for batch in prompt_batches(todo, batch_size):
                for run in runs:
                    pending = missing(batch, run)
                    if not pending:
                        continue
                    llm.use_method(run.name, **run.options)
                    bar.set_description(f"{run.label} {pending[0].task} {pending[0].length}")
                    generations = llm.generate([s.prompt for s in pending], temperature=0.0, seed=seed,
                                               max_new_tokens=[s.max_new_tokens for s in pending])
                    for s, g in zip(pending, generations):
                        results.add_record(make_record(s, run.name, run.options, run.label, seed, g), this_run)
                    bar.update(len(pending))
                if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                    write_checkpoint(out_dir, results)
                    last_checkpoint = time.monotonic()
    except BaseException:
        write_checkpoint(out_dir, results)  # keep what was generated: the next call resumes from it
        raise
    results.complete = True
    notes = [f"resumed {out_dir}: {done_before} of {len(prompts) * len(runs)} generations were there already "
             "(delete the folder to start over)"] if done_before else []
    return write_results(out_dir, results, notes)


def write_prompts(tokenizer: Any, suite: str, lengths: list[int], samples: int, seed: int, out_dir: Path, *,
                  model_name: str | None = None, **suite_options: Any) -> tuple[Path, int]:
    """Write `out_dir`/samples.json, the prompts a run with these settings decodes, without decoding them: it
    restores a results folder kept without its samples.json, so that the folder can be resumed and merged
    again. The folder's records must all name these prompts. Returns the file and its number of prompts."""
    prompts, _ = build_samples(suite, tokenizer, sorted(set(lengths)), samples, seed, **suite_options)
    settings = {"suite": suite, "model": model_name, "seed": seed}
    results = add_prompts_to_folder(Path(out_dir), [sample_entry(s) for s in prompts], settings)
    write_samples(Path(out_dir), results)
    return Path(out_dir) / SAMPLES_FILE, len(results.samples)


def merge_results(out_dir: Path, sources: list[Path], tasks: set[str] | None = None) -> EvalReport:
    """Merge the results folders `sources` into `out_dir` (with what `out_dir` holds already) and write the
    report of the union, or of `tasks` only. The folders must share suite, model and seed and agree on every
    prompt they share; a record in several of them is taken from the first (out_dir, then sources in order)."""
    results = merge_folders(out_dir, sources, tasks)
    notes = [f"merged {len(results.records)} records of {len(results.methods)} method runs"]
    if results.differing:
        notes.append(f"{results.differing} records were in more than one folder with another prediction "
                     "(kept the first)")
    return write_results(out_dir, results, notes)
