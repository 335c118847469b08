"""A results folder (samples.json, results.json, results.md, plots): read, extend, merge and write.

A folder holds the records of one suite, model and seed, from any number of calls: each call adds the
(method run, prompt) records it lacks. Two records name the same thing when their method label (method and
options, budget included) and prompt key (task, length, sample index; depth for the needle grid) agree; their
prompt fingerprints must agree too, or the two runs decoded different text and cannot be merged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsedecode.utils.files import atomic_write_text

from .records import PromptKey, RecordKey, prompt_key, record_key
from .report import (markdown_report, method_statistics, plot_accuracy_vs_length, plot_needle_heatmaps,
                     summary_rows, write_json_atomic)
from .stats import CONFIDENCE, RESAMPLES, SEED

SAMPLES_FILE = "samples.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"
ACCURACY_PLOT = "accuracy_vs_length.png"
NEEDLE_PLOT = "needle_heatmap.png"
SETTINGS = ("suite", "model", "seed")  # what every record of a folder shares: results of others do not mix


@dataclass(frozen=True)
class EvalReport:
    out_dir: Path
    files: list[Path]  # samples.json, results.json, results.md and the plots
    summary: list[dict[str, Any]]  # rows: task, length, method, score (%), samples
    statistics: list[dict[str, Any]]  # rows: method, average with its interval, difference to dense
    skipped: dict[str, str]  # task -> why it did not run
    markdown: str
    notes: list[str] = field(default_factory=list)  # what a resume or merge found, for the user


class ResultSet:
    """The samples and records of one suite, model and seed, keyed for resuming and merging."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = {key: settings[key] for key in SETTINGS}
        self.methods: dict[str, dict[str, Any]] = {}  # label -> {name, options, label}, in first-seen order
        self.samples: dict[PromptKey, dict[str, Any]] = {}
        self.records: dict[RecordKey, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.complete = True  # whether the call that last wrote the results finished (for a merge: all did)
        self.differing = 0  # records met twice with another prediction (the first one is kept)

    def check_settings(self, settings: dict[str, Any], source: str, target: str) -> None:
        for key in SETTINGS:
            if settings.get(key) != self.settings[key]:
                raise ValueError(f"{source} has {key} {settings.get(key)!r} but {target} has {key} "
                                 f"{self.settings[key]!r}: results of a different {key} cannot be merged "
                                 "(use another output folder)")

    def add_methods(self, methods: list[dict[str, Any]], source: str) -> None:
        """Method runs by label. Where two runs of one label both record their head roles (`roles`: the
        fingerprint of the resolved mask), they must agree: the label says only the options given, and
        the roles a method resolves without one (the model's shipped default) can change between versions."""
        for method in methods:
            known = self.methods.setdefault(method["label"], dict(method))
            roles, known_roles = method.get("roles"), known.get("roles")
            if roles and known_roles and roles != known_roles:
                raise ValueError(f"{source}: {method['label']} decoded with head roles ({roles}), but the results "
                                 f"already there under that name used other roles ({known_roles}); the model's "
                                 "default roles may have changed since: name the roles in the options (e.g. "
                                 "roles=learned:6) or use another output folder")
            if roles and not known_roles:
                known["roles"] = roles

    def add_samples(self, samples: list[dict[str, Any]], source: str) -> None:
        """Samples (samples.json entries) not yet in the set; a known one must have the same prompt."""
        for sample in samples:
            key = prompt_key(sample)
            known = self.samples.setdefault(key, sample)
            if known["prompt_hash"] != sample["prompt_hash"]:
                raise ValueError(f"{source}: the prompt of {_describe(key)} differs from the one already there "
                                 "(another haystack, QA file, tokenizer or version of the task code); such results "
                                 "cannot be merged")

    def add_record(self, record: dict[str, Any], source: str) -> None:
        """A record, unless the set has it already (then the first one stays)."""
        key = record_key(record)
        sample = self.samples.get(key[1])
        if sample is None or sample["prompt_hash"] != record.get("prompt_hash"):
            raise ValueError(f"{source}: record {record['method']} on {_describe(key[1])} does not match a sample "
                             "of its samples.json")
        known = self.records.setdefault(key, record)
        if known is not record and known["prediction"] != record["prediction"]:
            self.differing += 1

    def has(self, label: str, key: PromptKey) -> bool:
        return (label, key) in self.records

    def merge(self, folder: Path, target: str, tasks: set[str] | None = None) -> None:
        """Add the samples and records of a results folder (of `tasks` only, when given), after checking that
        its settings match."""
        samples, results = read_folder(folder)
        self.check_settings(results, str(folder), target)
        kept = (lambda task: True) if tasks is None else tasks.__contains__
        self.add_samples([s for s in samples["samples"] if kept(s["task"])], str(folder))
        self.add_methods(results["methods"], str(folder))
        for record in results["records"]:
            if kept(record["task"]):
                self.add_record(record, str(folder))
        self.skipped.update({task: why for task, why in results["skipped"].items() if kept(task)})
        self.complete = self.complete and results["complete"]

    def ordered_records(self) -> list[dict[str, Any]]:
        """Records by length, task (in sample order), depth, sample index and method (in run order): the same
        file whatever order the calls that made them ran in."""
        task_rank = {task: rank for rank, task in enumerate(dict.fromkeys(key[0] for key in self.samples))}
        method_rank = {label: rank for rank, label in enumerate(self.methods)}

        def order(item: tuple[RecordKey, dict[str, Any]]) -> tuple:
            (label, (task, length, index, depth)), _ = item
            return length, task_rank[task], depth, index, method_rank[label]

        return [record for _, record in sorted(self.records.items(), key=order)]

    def samples_file(self) -> dict[str, Any]:
        return {**self.settings, "samples": list(self.samples.values())}

    def results_file(self, records: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        ran = {r["task"] for r in records}
        return {**self.settings, "lengths": sorted({r["length"] for r in records}),
                "methods": list(self.methods.values()),
                "skipped": {task: why for task, why in self.skipped.items() if task not in ran},
                "complete": complete, "records": records}


def read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The samples.json and results.json of a results folder, checked to hold keyed records."""
    files = {}
    if (Path(folder) / RESULTS_FILE).exists() and not (Path(folder) / SAMPLES_FILE).exists():
        raise ValueError(f"{folder} has results but no {SAMPLES_FILE} (a folder kept without its prompts): write "
                         "them again with the eval command that made the results plus --prompts-only and "
                         f"--out {folder}")
    for name in (SAMPLES_FILE, RESULTS_FILE):
        files[name] = _read_json(Path(folder) / name)
    samples, results = files[SAMPLES_FILE], files[RESULTS_FILE]
    if any("prompt_hash" not in item for item in [*samples["samples"], *results["records"]]):
        raise ValueError(f"{folder} was written before records carried their keys (no prompt_hash): it cannot be "
                         "resumed or merged; use another output folder")
    return samples, results


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def open_results(out_dir: Path, settings: dict[str, Any]) -> ResultSet:
    """The results already in `out_dir` (a run resumes into them), or an empty set when it has none."""
    results = ResultSet(settings)
    if (Path(out_dir) / RESULTS_FILE).exists():
        results.merge(out_dir, "this run")
    return results


def merge_folders(out_dir: Path, sources: list[Path], tasks: set[str] | None = None) -> ResultSet:
    """The results of `out_dir` (when it has some) and of every source folder (of `tasks` only, when given),
    merged: the first of duplicate records is kept; different settings or prompts are refused."""
    folders = [Path(s) for s in sources]
    if (Path(out_dir) / RESULTS_FILE).exists():
        folders.insert(0, Path(out_dir))
    if not folders:
        raise ValueError("give at least one results folder to merge")
    _, first = read_folder(folders[0])
    results = ResultSet(first)
    for folder in folders:
        results.merge(folder, str(folders[0]), tasks)
    missing = sorted(set(tasks or ()) - {key[0] for key in results.samples})
    if missing:
        raise ValueError(f"no results of task(s) {', '.join(missing)} in these folders; check the task names")
    return results


def add_prompts_to_folder(out_dir: Path, samples: list[dict[str, Any]], settings: dict[str, Any]) -> ResultSet:
    """The samples.json entries `samples` with those of `out_dir`, checked against its records: for a folder
    kept without its (large) samples.json. Every record there must name one of the samples, with the same
    prompt fingerprint."""
    results = ResultSet(settings)
    given = "the prompts of these settings"
    results.add_samples(samples, given)
    samples_path, results_path = Path(out_dir) / SAMPLES_FILE, Path(out_dir) / RESULTS_FILE
    for path in (samples_path, results_path):
        if not path.exists():
            continue
        document = _read_json(path)
        results.check_settings(document, str(path), given)
        if path == samples_path:
            results.add_samples(document["samples"], str(path))
            continue
        unmatched = [r for r in document["records"] if results.samples.get(prompt_key(r), {}).get("prompt_hash")
                     != r.get("prompt_hash")]
        if unmatched:
            raise ValueError(f"{len(unmatched)} of the {len(document['records'])} records of {path} name no prompt "
                             f"of these settings (first: {unmatched[0]['method']} on "
                             f"{_describe(prompt_key(unmatched[0]))}); give the --lengths, --samples, --tasks, "
                             "--seed and haystack the folder's results were made with")
    return results


def write_samples(out_dir: Path, results: ResultSet) -> None:
    write_json_atomic(Path(out_dir) / SAMPLES_FILE, results.samples_file())


def write_checkpoint(out_dir: Path, results: ResultSet) -> None:
    """results.json as it stands, marked incomplete (a later call resumes from it)."""
    write_json_atomic(Path(out_dir) / RESULTS_FILE, results.results_file(results.ordered_records(), False))


def write_results(out_dir: Path, results: ResultSet, notes: list[str]) -> EvalReport:
    """samples.json, results.json with its summary and statistics, results.md and the plots."""
    out_dir = Path(out_dir)
    records = results.ordered_records()
    present = {r["method"] for r in records}
    labels = [label for label in results.methods if label in present]
    summary = summary_rows(records)
    statistics = method_statistics(records, labels)
    document = results.results_file(records, results.complete)
    document.update(summary=summary, statistics={"confidence": CONFIDENCE, "resamples": RESAMPLES, "seed": SEED,
                                                 "unit": "prompt, resampled within each task x length cell",
                                                 "methods": statistics})
    write_samples(out_dir, results)
    write_json_atomic(out_dir / RESULTS_FILE, document)
    task_order = list(dict.fromkeys(key[0] for key in results.samples))
    facts = {"model": results.settings["model"] or "-", "seed": results.settings["seed"],
             "samples per cell": _samples_per_cell(records)}
    markdown = markdown_report(f"{results.settings['suite']} results", facts, labels, task_order, records,
                               document["skipped"], statistics)
    atomic_write_text(out_dir / REPORT_FILE, markdown)
    files = [out_dir / SAMPLES_FILE, out_dir / RESULTS_FILE, out_dir / REPORT_FILE, out_dir / ACCURACY_PLOT]
    suite = results.settings["suite"]
    x_label = "generation budget (max new tokens)" if suite == "reasoning" else "prompt length (tokens)"
    plot_accuracy_vs_length(records, labels, out_dir / ACCURACY_PLOT, x_label)
    if suite == "needle":
        plot_needle_heatmaps(records, labels, out_dir / NEEDLE_PLOT)
        files.append(out_dir / NEEDLE_PLOT)
    return EvalReport(out_dir, files, summary, statistics, document["skipped"], markdown, notes)


def _samples_per_cell(records: list[dict[str, Any]]) -> str:
    """Prompts per method and cell (task x length; x depth for the needle grid): one number, or the range."""
    counts: dict[tuple, int] = {}
    for r in records:
        task, length, _, depth = prompt_key(r)
        counts[r["method"], task, length, depth] = counts.get((r["method"], task, length, depth), 0) + 1
    low, high = min(counts.values(), default=0), max(counts.values(), default=0)
    return str(low) if low == high else f"{low}-{high}"


def _describe(key: PromptKey) -> str:
    task, length, index, depth = key
    return f"{task} at length {length}, sample {index}" + (f", depth {depth[0]}" if depth else "")
