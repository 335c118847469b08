"""The engine check, one process on one GPU: (a) decode-step timing of the Llama-3.1-8B shape at 128K on the
continuous-batching engine, and (b) continuous-batching parity.

    sparsedecode bench engine-check                                # (a) then (b)
    sparsedecode bench engine-check --no-parity                    # (a) only; --no-timing: (b) only
    sparsedecode bench engine-check --parity-model smollm2-135m   # (b) on real weights (the model pulled)
    sparsedecode bench engine-check --no-timing --parity-model qwen2.5-coder-1.5b --tensor-parallel-size 2

(a) `bench e2e` (the same code, `e2e.run_e2e`) of `random:llama-3.1-8b` at 128K, batches 1, 2, 4 and the
largest that fits in the KV pool (`max`), methods dense, lychee and lychee+lfps with the options of the
128K rows of docs/benchmarks.md (budget 4096, roles random:24; lychee+lfps refreshing every 16 steps, its
default), decode compiled and in CUDA graphs. It prints the e2e table (ms/step, x dense, ceiling, share
of the ceiling reached, engine and host ms) and the KV pool's fit, and writes results.json, results.md
and the plots to `<out>/timing`.

(b) On `--parity-model` (default `random:tiny-llama`: the engine's scheduling, slots and per-sequence
method state are under test, not the speed of a large shape), `requests` requests with prompt lengths
spread log-uniformly over `min_len` .. `max_len` arrive one engine step apart, more of them than there
are decode slots (later ones wait for a slot, and reuse it), each decoding its own number of tokens
greedily; then each is decoded alone on the empty engine. Their tokens must match, for dense, for lychee
with every KV head a retrieval head (roles all: exact), and for lychee+lfps (sparse, with per-sequence
selections and refresh clocks). float32 by default: random weights have near-ties that the rounding
differences between batch shapes flip in bf16. A real model (`--parity-model smollm2-135m`, its files in
the model cache: the GPU machine may have no network) runs with max_context raised beyond its trained
length to hold the longest prompt: RoPE then extrapolates, which changes what the tokens mean, not the
parity checked. It prints a table per request and writes parity.json and parity.md to `out`.

With `tensor_parallel_size` N > 1, (b) checks tensor parallelism instead: the same arriving requests served
by the model split over N GPUs (the engine's own worker processes) against served on one GPU, each method
alike; the tokens must match.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine import LLM, LLMEngine, SamplingParams
from ..models.shapes import RANDOM_PREFIX
from .common import markdown_table, prompts, release_memory, write_atomic
from .e2e import MAX_BATCH, E2EOptions, results_markdown, run_e2e

TIMING_METHODS = ["dense", "lychee", "lychee+lfps"]


@dataclass
class ParityOptions:
    model: str = "random:tiny-llama"
    dtype: str = "float32"
    requests: int = 16
    min_len: int = 4096
    max_len: int = 65536
    min_new_tokens: int = 8
    max_new_tokens: int = 48
    arrival_gap: int = 1  # engine steps between two arrivals: the slots fill, later requests wait
    max_num_seqs: int = 8  # decode slots
    decode_steps: int = 4  # decode steps per engine step
    sparse_budget: int = 1024  # lychee+lfps's token budget
    device: str | None = None
    seed: int = 0
    tensor_parallel_size: int = 1  # > 1: served on that many GPUs against served on one

    def __post_init__(self) -> None:
        if self.tensor_parallel_size > 1 and self.model.startswith(RANDOM_PREFIX):
            raise ValueError(f"the tensor-parallel parity compares two loads of the model, and random weights "
                             f"differ from load to load: give a real model ({self.model} was given)")


def timing_options(model: str = "random:llama-3.1-8b", context: int = 131072, device: str | None = None,
                   steps: int = 30, warmup: int = 5, gpu_memory_utilization: float = 0.9) -> E2EOptions:
    """Part (a) as `bench e2e` options."""
    return E2EOptions(models=[model], contexts=[context], batches=[1, 2, 4, MAX_BATCH], methods=TIMING_METHODS,
                      budget=4096, roles="random:24", steps=steps, warmup=warmup, hf_modes=(), device=device,
                      gpu_memory_utilization=gpu_memory_utilization)


def serve(engine: LLMEngine, requests: list[tuple[list[int], int, int]]) -> tuple[list[list[int]], int]:
    """Greedy tokens of each (prompt, max_tokens, arrival step) request, queued when the engine reaches its
    arrival step, stepping the engine until all have finished; and the most sequences that ran together."""
    index: dict[str, int] = {}
    tokens: list[list[int] | None] = [None] * len(requests)
    step = peak = 0
    while any(t is None for t in tokens):
        for i, (prompt, max_tokens, arrival) in enumerate(requests):
            if arrival == step:
                index[engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))] = i
        for output in engine.step():
            if output.finished:
                tokens[index[output.request_id]] = output.token_ids
        peak = max(peak, engine.stats()["running"])
        step += 1
    return tokens, peak


def run_parity(opts: ParityOptions, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Part (b): one row per (method, request)."""
    rng = random.Random(opts.seed)
    lengths = [round(math.exp(rng.uniform(math.log(opts.min_len), math.log(opts.max_len))))
               for _ in range(opts.requests)]
    new_tokens = [rng.randint(opts.min_new_tokens, opts.max_new_tokens) for _ in range(opts.requests)]
    arrivals = [i * opts.arrival_gap for i in range(opts.requests)]
    max_context = max(lengths) + opts.max_new_tokens
    gpus = opts.tensor_parallel_size
    log(f"parity: loading {opts.model} ({opts.dtype})")
    with _engine(opts, max_context, 1) as llm:
        longest = prompts(llm.tokenizer, llm.config.vocab_size, max(lengths), opts.requests, seed=opts.seed)
        requests = [(p[:n], m, a) for p, n, m, a in zip(longest, lengths, new_tokens, arrivals)]
        covering = -(-llm.max_context // llm.block_size) * llm.block_size
        methods = [("dense", "dense", {}), ("lychee, roles all", "lychee", dict(roles="all", budget=covering)),
                   ("lychee+lfps", "lychee+lfps", dict(budget=opts.sparse_budget))]
        served = _serve_each(llm, methods, requests, opts, log)
        # The reference: each request alone on the same engine; or, for `gpus`, served on one GPU.
        references = (_alone_each(llm, methods, requests, log) if gpus == 1 else
                      {label: tokens for label, (tokens, _) in served.items()})
    del llm
    release_memory()
    if gpus > 1:
        log(f"parity: loading {opts.model} on {gpus} GPUs")
        with _engine(opts, max_context, gpus) as llm:
            served = _serve_each(llm, methods, requests, opts, log)
        del llm
        release_memory()
    rows = []
    for label, (tokens, peak) in served.items():
        for i, (a, b) in enumerate(zip(tokens, references[label])):
            differs = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
            rows.append(dict(method=label, request=i, prompt_tokens=lengths[i], arrival_step=arrivals[i],
                             new_tokens=new_tokens[i], ran_together=peak, same=a == b, first_difference=differs))
    return rows


def _engine(opts: ParityOptions, max_context: int, gpus: int) -> LLM:
    llm = LLM(opts.model, device=opts.device, dtype=opts.dtype, max_context=max_context,
              max_num_seqs=opts.max_num_seqs, enable_prefix_caching=False, tensor_parallel_size=gpus)
    llm.engine.decode_steps = opts.decode_steps
    return llm


def _serve_each(llm: LLM, methods: list[tuple[str, str, dict[str, Any]]], requests: list[tuple[list[int], int, int]],
                opts: ParityOptions, log: Callable[[str], None]) -> dict[str, tuple[list[list[int]], int]]:
    """Per method label: `serve`'s tokens of the arriving requests, and the most that ran together."""
    served = {}
    for label, method, options in methods:
        llm.use_method(method, **options)
        log(f"parity: {label}, {len(requests)} requests arriving every {opts.arrival_gap} engine steps")
        served[label] = serve(llm.engine, requests)
        log(f"parity: {label}, up to {served[label][1]} sequences ran together")
    return served


def _alone_each(llm: LLM, methods: list[tuple[str, str, dict[str, Any]]], requests: list[tuple[list[int], int, int]],
                log: Callable[[str], None]) -> dict[str, list[list[int]]]:
    """Per method label: the tokens of each request served alone."""
    alone = {}
    for label, method, options in methods:
        llm.use_method(method, **options)
        log(f"parity: {label}, each request alone")
        alone[label] = [serve(llm.engine, [(prompt, max_tokens, 0)])[0][0] for prompt, max_tokens, _ in requests]
    return alone


def parity_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return [dict(method=m, requests=sum(r["method"] == m for r in rows),
                 ran_together=max(r["ran_together"] for r in rows if r["method"] == m),
                 same_tokens=sum(r["same"] for r in rows if r["method"] == m)) for m in methods]


def run_engine_check(timing: E2EOptions | None, parity: ParityOptions | None, out: Path,
                     log: Callable[[str], None] = print) -> bool:
    """Both parts (either may be None); returns whether every parity request matched."""
    if timing is not None:
        results = run_e2e(timing, out / "timing")
        log(results_markdown(results))
    if parity is None:
        return True
    rows = run_parity(parity, log)
    summary = markdown_table(parity_summary(rows))
    details = markdown_table(rows)
    write_atomic(out / "parity.json", json.dumps(rows, indent=1))
    write_atomic(out / "parity.md", f"{summary}\n\n{details}\n")
    kind = ("Continuous-batching parity" if parity.tensor_parallel_size == 1 else
            f"Tensor-parallel parity, {parity.tensor_parallel_size} processes (one per GPU) against 1")
    log(f"\n## {kind} ({parity.model}, {parity.dtype})\n\n{summary}\n\n{details}\n")
    return all(r["same"] for r in rows)
