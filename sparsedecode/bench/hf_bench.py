"""Tokens per second of transformers' `generate` with and without `sparsedecode.hf.sparse_decoding`.

Per model and context, batch 1, greedy: plain `generate` with a static cache, eager and compiled (its
default on CUDA), against `generate` inside `sparse_decoding` for each method. A decode step's time is
the median interval between consecutive generated tokens (`generate_step_seconds`). The transformers
model's parameters are views of the engine's loaded weights (`hf_model_like`), so every row decodes the
very same weights.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..hf import sparse_decoding
from ..models.config import ModelConfig
from ..models.loader import default_device, default_dtype, load_model
from ..models.shapes import RANDOM_PREFIX
from .common import device_name, markdown_table, prompts, release_memory, write_atomic
from .e2e import generate_step_seconds, hf_model_like, method_options


@dataclass
class HFBenchOptions:
    models: list[str]
    contexts: list[int]
    methods: list[str]
    budget: int = 4096
    roles: str | None = None  # lychee-type roles; None: e2e.RANDOM_SHAPE_ROLES on random-weight shapes, learned on real
    steps: int = 32
    compiled_baseline: bool = True
    haystack: str | None = None
    device: str | None = None


def check_positions(spec: str, config: ModelConfig, context: int, new_tokens: int) -> None:
    """ValueError naming the fix when a `context`-token prompt plus `new_tokens` is over the model's positions."""
    if context + new_tokens > config.max_position_embeddings:
        raise ValueError(f"{spec}: a {context}-token prompt plus {new_tokens} generated tokens is over its "
                         f"{config.max_position_embeddings} positions; give a shorter --contexts")


COLUMNS = ["model", "ctx", "generate", "ms/step", "tok/s", "x eager", "x compiled", "KV read"]


def run_hf_bench(opts: HFBenchOptions, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    device = torch.device(opts.device) if opts.device else default_device()
    dtype = default_dtype(device)
    rows: list[dict[str, Any]] = []
    for spec in opts.models:
        log(f"loading {spec}")
        loaded = load_model(spec, device, dtype)
        real = not spec.startswith(RANDOM_PREFIX)
        hf = hf_model_like(loaded.model)
        for context in opts.contexts:
            check_positions(spec, loaded.config, context, opts.steps + 1)
            ids = torch.tensor(prompts(loaded.tokenizer, loaded.config.vocab_size, context, 1, opts.haystack),
                               device=device)
            plain = {"cache_implementation": "static"}
            timed: list[tuple[str, float, float | None]] = []
            modes = ["eager"] + (["compiled"] if opts.compiled_baseline and device.type == "cuda" else [])
            for mode in modes:
                log(f"[{spec} {context}] plain generate ({mode})")
                seconds = generate_step_seconds(hf, ids, opts.steps, warm_up_whole=mode == "compiled",
                                                disable_compile=mode == "eager", **plain)
                timed.append((f"plain, {mode}", seconds, 1.0))
            for method in opts.methods:
                log(f"[{spec} {context}] sparse_decoding({method})")
                with sparse_decoding(hf, method=method, **method_options(method, opts.budget, opts.roles, real)) as sd:
                    seconds = generate_step_seconds(hf, ids, opts.steps, disable_compile=True)
                    fraction = sd.kv_fraction_read
                timed.append((f"sparse_decoding {method}", seconds, fraction))
            base = {name: s for name, s, _ in timed}
            for name, seconds, fraction in timed:
                rows.append({
                    "model": spec, "ctx": context, "generate": name, "ms/step": seconds * 1e3,
                    "tok/s": 1 / seconds, "x eager": base["plain, eager"] / seconds,
                    "x compiled": base["plain, compiled"] / seconds if "plain, compiled" in base else None,
                    "KV read": fraction,
                })
        del hf, loaded
        release_memory()
    meta = {"device": device_name(device),
            "torch": torch.__version__, "steps": opts.steps, "budget": opts.budget}
    results = {"meta": meta, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    write_atomic(out / "results.md", results_markdown(results))
    return results


def results_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    head = (f"# transformers generate with sparse_decoding\n\n{meta['device']}, torch {meta['torch']}, batch 1, "
            f"greedy, budget {meta['budget']}; a step = the median interval between {meta['steps']} + 1 "
            "generated tokens. x eager / x compiled: plain generate's step (static cache) over this one.\n\n")
    return head + markdown_table(results["rows"], COLUMNS) + "\n"
