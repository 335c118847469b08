"""One record per (method run, prompt): what was generated and scored, and the keys that name it across runs,
so that results of several calls can be resumed and merged exactly."""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any

from .needle import NEEDLE_TASK
from .samples import Sample
from .scoring import score

PromptKey = tuple[str, int, int, tuple[float, ...]]
RecordKey = tuple[str, PromptKey]


def prompt_hash(prompt: str) -> str:
    """A short fingerprint of a prompt's text: two runs that name a prompt alike must have decoded the same
    text (the haystack, QA files, tokenizer and task code all shape it)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def prompt_key(item: dict[str, Any]) -> PromptKey:
    """What names a prompt (a sample's or a record's fields): task, length and sample index; for the needle
    grid also the depth, which the grid sets (its samples are numbered within each depth)."""
    depth = tuple(item["depths"]) if item["task"] == NEEDLE_TASK else ()
    return item["task"], item["length"], item["index"], depth


def sample_key(sample: Sample) -> PromptKey:
    return prompt_key(vars(sample))


def record_key(record: dict[str, Any]) -> RecordKey:
    """The method run (its label holds the method and every option, budget included) and the prompt."""
    return record["method"], prompt_key(record)


def sample_entry(sample: Sample) -> dict[str, Any]:
    """A sample as samples.json holds it: its fields and its prompt's fingerprint."""
    return {**asdict(sample), "prompt_hash": prompt_hash(sample.prompt)}


def make_record(sample: Sample, method: str, options: dict[str, Any], label: str, seed: int,
                generation: Any) -> dict[str, Any]:
    """The record of `generation` (an `LLM.generate` result) of `sample` by method run `label`."""
    return {
        "task": sample.task, "length": sample.length, "index": sample.index, "depths": sample.depths,
        "seed": seed, "prompt_hash": prompt_hash(sample.prompt),
        "method": label, "method_name": method, "options": options,
        "prediction": generation.text,
        "score": score(sample.metric, generation.text, sample.references), "references": sample.references,
        "prompt_tokens": generation.prompt_tokens, "output_tokens": len(generation.token_ids),
        "prefill_seconds": generation.prefill_seconds, "decode_tokens_per_s": generation.decode_tokens_per_s,
        "kv_fraction_read": generation.kv_fraction_read,
    }
