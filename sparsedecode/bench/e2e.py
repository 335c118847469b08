"""End-to-end decode benchmark: one decode step of the whole model (weights and attention) per method on the
serving engine, against its bytes floor, our dense step measured in the same run, and transformers' own
`generate`.

How a row is measured:

- One `LLM` per model: prefix caching off, as many decode slots as the largest batch asked (`max`: the
  engine's default), its KV pool sized by `gpu_memory_utilization` (or `num_blocks`) while the benchmarked
  method keeping the most per-block state is set (Quest's page bounds), so that every method fits after it.
  The transformers baseline runs first, on its own load of the weights: the pool takes the memory it needs.
- Per context, the largest batch asked of requests with distinct prompts of `context` tokens (random ids
  for random-weight shapes, rotations of the haystack text for real models) is added, and the engine steps
  until every one decodes: a real chunked prefill. `max` is the most sequences of that context (plus the
  tokens the benchmark decodes) that the pool holds. Batches run from the largest down, the newest requests
  aborted in between, so a batch of B holds decode slots 0 .. B-1 and runs in the engine's CUDA-graph
  bucket (the next of 1, 2, 4, ..., max_num_seqs; rows beyond B point at the null block and read nothing).
- Per method: `LLM.use_method` (every sequence's method state restarts as after its prefill; `sdpa`, a
  benchmark-only method, is handed to `engine.use_method` and stays out of the registry). The device step
  is `engine.runner.decode` of rows built from the engine's sequences at position `context`, so every timed
  step sees the same context. On CUDA it is the paired difference of a two-step and a one-step call, timed
  with CUDA events: loading the rows into the step buffers and the host sync that ends every call cancel
  out. Elsewhere it is the one-step call. Warm-up calls come first (the first captures the CUDA graph).
- Steps of a sequence that read the same KV rows are one kind (`common.step_kinds` over `VARIANT_WINDOW`
  steps, e.g. lfps's refresh every 16th step and the steps between); each kind is timed at its first step,
  and the step time is the kinds' medians weighted by how often they occur.
- Engine step (`engine_ms`): the median of `engine.step()`, which decodes every sequence one token at its
  real, growing position: the scheduler, building the rows, the step and the tokens' bookkeeping. `host_ms`
  is what it takes beyond the device step of the method's most common kind. Not for `sdpa`, which attends
  to a fixed length.
- Bytes per step = weights + batch * KV rows the method reads (`kv_tokens_read`) * bytes per row.
  Floor = bytes / copy bandwidth measured in the same run (read + write bytes per second). Ceiling =
  dense bytes / method bytes: the speedup over dense if both ran at the same bandwidth.
- Over several GPUs (`tensor_parallel_size` N: the model split by KV head, the engine's own worker processes
  beside this one, rank 0) the step is timed on rank 0's GPU, whose collectives wait for the others. Bytes,
  floor and ceiling are per GPU: (weights + batch * KV rows read) / N, against one GPU's copy bandwidth. The
  transformers baseline is left out (it runs on one GPU).
- `sdpa` is dense attention through PyTorch SDPA (FlashAttention) over a contiguous copy of each
  sequence's blocks, made per layer inside the step because SDPA takes no block table: it moves the KV
  three times, and is counted at dense's bytes. `sparsedecode bench kernel` compares the attention alone
  on a contiguous cache.
"""
from __future__ import annotations

import copy
import json
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core import DecodeBatch, KVPool
from ..engine import LLM, LLMEngine, ModelRunner, SamplingParams
from ..engine.model_runner import DecodeRow
from ..methods import METHODS, DecodeMethod, method_class
from ..models.config import ModelConfig
from ..models.loader import default_device, default_dtype, load_config, load_model, load_tokenizer
from ..models.transformer import Transformer
from ..models.weights import to_transformers
from ..utils.tokens import token_count_label
from .common import (
    Timing,
    format_cell,
    kernel_times,
    markdown_table,
    measure_copy_bandwidth,
    median_time,
    paired_difference,
    plot_speedup_vs_context,
    plot_time_vs_floor,
    prompts,
    release_memory,
    step_kinds,
    synchronize,
    write_atomic,
)

SDPA = "sdpa"
MAX_BATCH = "max"  # in `batches`: the most sequences of the context that the KV pool holds
MAX_NUM_SEQS = 64  # decode slots when `max` is asked (the engine's default): `max` takes at most these
BLOCK_SIZE = 64  # KV pool block (tokens)
DECODE_MARGIN = 4096  # positions beyond the longest context: room for the tokens the benchmark decodes
START_STEPS = 2  # engine steps after every sequence has its first token (see `_start_decoding`)
VARIANT_WINDOW = 4096  # decode steps over which step-kind frequencies are counted
PROFILE_TOP = 12  # kernels listed per profiled step
HEADROOM_BYTES = 2 << 30  # the transformers baseline's activations and kernel scratch


class SdpaDense(DecodeMethod):
    """Dense decode attention through PyTorch SDPA (FlashAttention with GQA) over exactly `length` tokens,
    gathered from the pool into one contiguous copy per layer. For this benchmark only: the length is fixed
    when the step is captured in a CUDA graph, which holds for the device step (every timed step replays
    the same position)."""

    name = SDPA
    defaults = dict(length=None)

    def __init__(self, config: ModelConfig, **options: Any) -> None:
        super().__init__(config, **options)
        if self.options["length"] is None:
            raise ValueError(f"method {SDPA!r} is for benchmarks only: give length=<tokens attended>")

    def attend(self, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        n = self.options["length"]
        tables = batch.block_tables[:, : -(-n // pool.block_size)].long()
        # One gather per tensor into [Hkv, B, blocks, P, D], viewed as [B, Hkv, tokens, D]: each token's row
        # stays unit-stride, as SDPA's fused kernels want.
        k, v = (part[layer].transpose(0, 1)[:, tables].flatten(2, 3).transpose(0, 1)[:, :, :n]
                for part in (pool.k, pool.v))
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=self.scale, enable_gqa=True)[:, :, 0]

    def kv_tokens_read(self, seq_len: int, step: int) -> float:
        return self.dense_tokens_read(seq_len)


RANDOM_SHAPE_ROLES = "random:24"  # plus layer 0: 32 retrieval units of Llama-3.1-8B's 256


@dataclass
class E2EOptions:
    models: list[str]
    contexts: list[int]
    batches: list[int | str]  # batch sizes, and/or MAX_BATCH
    methods: list[str]
    budget: int = 4096
    roles: str | None = None  # None: RANDOM_SHAPE_ROLES on random-weight shapes, the learned roles on real ones
    steps: int = 30
    warmup: int = 5
    hf_modes: tuple[str, ...] = ("eager", "compiled")  # transformers baselines; empty for none
    hf_context: int = 32768
    hf_random_shapes: bool = False  # also compare random-weight shapes with transformers (real prefill)
    haystack: str | None = None  # the prompt text source of real models (default: the essays)
    device: str | None = None
    compile_decode: bool = True  # False: the engine's element-wise work unfused (to measure what fusing gives)
    compile_mode: str = "default"  # torch.compile mode of that work (`Transformer.compile_decode`)
    decode_linear: str = "auto"  # what runs the step's linear layers (`LLM`'s decode_linear)
    profile: bool = False  # also record the device time per kernel of one step of each method (CUDA)
    gpu_memory_utilization: float = 0.9  # the share of the GPU the engine takes: weights, activations, KV pool
    num_blocks: int | None = None  # KV pool blocks, instead of sizing the pool from gpu_memory_utilization
    tensor_parallel_size: int = 1  # GPUs the model is split over (the engine starts its own workers)
    temperature: float = 0.0  # the requests' sampling: 0 greedy, else sampled at it within top_p
    top_p: float = 1.0


@dataclass
class Measurement:
    timing: Timing  # per device step, weighted over step kinds
    kv_rows: float  # KV rows one sequence reads per step, weighted the same way
    variants: dict[str, dict[str, float]] = field(default_factory=dict)  # per step kind ("step N": its first)
    engine_step: Timing | None = None  # `engine.step()`, None where not measured


def step_bytes(weight_bytes: float, kv_rows: float, row_bytes: int, batch: int) -> float:
    """Bytes one decode step reads: the weights once, plus each sequence's KV rows."""
    return weight_bytes + batch * kv_rows * row_bytes


def derive(timing: Timing, nbytes: float, batch: int, dense_seconds: float, dense_bytes: float,
           bandwidth: float) -> dict[str, float]:
    """A row's figures from its step timing and bytes, our dense step's, and the copy bandwidth."""
    floor = nbytes / bandwidth
    speedup = dense_seconds / timing.median
    ceiling = dense_bytes / nbytes
    return dict(
        ms=timing.median * 1e3, p10_ms=timing.p10 * 1e3, p90_ms=timing.p90 * 1e3, mean_ms=timing.mean * 1e3,
        tokens_per_s=batch / timing.median, bytes_per_step=nbytes, gbps=nbytes / timing.median / 1e9,
        floor_ms=floor * 1e3, time_over_floor=timing.median / floor, speedup=speedup, ceiling=ceiling,
        ceiling_fraction=speedup / ceiling,
    )


def _log(message: str) -> None:
    print(message, flush=True)


def run_e2e(opts: E2EOptions, out: Path | None = None, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run the benchmark; with `out`, rewrite results.json, results.md and the plots there after each context."""
    start = time.perf_counter()
    log = _timestamped(log, start)
    device = torch.device(opts.device) if opts.device else default_device()
    log(f"measuring copy bandwidth on {device}")
    bandwidth = measure_copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)")
    results: dict[str, Any] = {"meta": _meta(opts, device, bandwidth), "rows": [], "hf": [], "pools": [], "startup": [],
                               "notes": []}
    methods = list(dict.fromkeys(["dense", *opts.methods]))  # dense first: every ratio needs it
    for name in methods:
        if name not in METHODS and name != SDPA:
            _note(results, log, f"method {name!r} is not registered in this build: skipped")
    methods = [m for m in methods if m in METHODS or m == SDPA]
    for spec in opts.models:
        _bench_model(spec, methods, opts, device, bandwidth, results, out, log)
    return results


def _timestamped(log: Callable[[str], None], start: float) -> Callable[[str], None]:
    return lambda message: log(f"[{time.perf_counter() - start:6.1f}s] {message}")


def _meta(opts: E2EOptions, device: torch.device, bandwidth: float) -> dict[str, Any]:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(
        device=name, torch=torch.__version__, transformers=transformers.__version__,
        copy_bandwidth=bandwidth, steps=opts.steps, warmup=opts.warmup, budget=opts.budget, roles=opts.roles,
        hf_context=opts.hf_context, compile_decode=opts.compile_decode, compile_mode=opts.compile_mode,
        decode_linear=opts.decode_linear, gpu_memory_utilization=opts.gpu_memory_utilization,
        num_blocks=opts.num_blocks, tensor_parallel_size=opts.tensor_parallel_size, temperature=opts.temperature,
        top_p=opts.top_p,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def _note(results: dict[str, Any], log: Callable[[str], None], text: str) -> None:
    results["notes"].append(text)
    log("note: " + text)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _bench_model(spec: str, methods: list[str], opts: E2EOptions, device: torch.device, bandwidth: float,
                 results: dict[str, Any], out: Path | None, log: Callable[[str], None]) -> None:
    try:
        config, tokenizer = load_config(spec), load_tokenizer(spec)
    except Exception as e:  # noqa: BLE001 - a model that cannot load (not pulled, no network) must not end the run
        _note(results, log, f"{spec}: could not be loaded, skipped: {_first_line(e)}")
        return
    real = tokenizer is not None
    contexts = opts.contexts
    if real:  # beyond its trained length a prompt is meaningless and its real prefill costly
        contexts = [c for c in contexts if c <= config.max_position_embeddings]
        if len(contexts) < len(opts.contexts):
            _note(results, log, f"{spec}: contexts above its trained {config.max_position_embeddings} skipped")
    if not contexts:
        return
    options = {m: method_options(m, opts.budget, opts.roles, real) for m in methods}
    instances = {}
    for m in methods:
        try:  # refuse a method that cannot run on this shape now, not after minutes of measurements
            instances[m] = _method_class(m)(config, **options[m], **({"length": 1} if m == SDPA else {}))
        except (ValueError, TypeError) as e:
            _note(results, log, f"{spec}: {m} skipped: {e}")
    methods = [m for m in methods if m in instances]
    dtype = default_dtype(device)
    hf_seconds = {}
    if opts.hf_modes and (real or opts.hf_random_shapes) and opts.tensor_parallel_size > 1:
        _note(results, log, f"{spec}: transformers baseline skipped: it runs on one GPU, the engine on "
                            f"{opts.tensor_parallel_size}")
    elif opts.hf_modes and (real or opts.hf_random_shapes):
        hf_seconds = _hf_baseline(spec, config, tokenizer, contexts, opts, device, dtype, results, log)
    # The pool is sized while the method keeping the most per-block state is set: every other fits after it.
    sizing = max((m for m in methods if m != SDPA), key=lambda m: instances[m].block_state_bytes(BLOCK_SIZE, dtype))
    slots = max([b for b in opts.batches if b != MAX_BATCH], default=1)
    if MAX_BATCH in opts.batches:
        slots = max(slots, MAX_NUM_SEQS)
    log(f"loading {spec}")
    loading = time.perf_counter()
    try:
        llm = LLM(spec, method=sizing, device=device, dtype=dtype, max_context=max(contexts) + DECODE_MARGIN,
                  block_size=BLOCK_SIZE, compile_decode=opts.compile_decode, compile_mode=opts.compile_mode,
                  decode_linear=opts.decode_linear,
                  max_num_seqs=slots, num_blocks=opts.num_blocks, gpu_memory_utilization=opts.gpu_memory_utilization,
                  enable_prefix_caching=False, tensor_parallel_size=opts.tensor_parallel_size, **options[sizing])
    except Exception as e:  # noqa: BLE001 - e.g. no memory left for a pool: the other models still run
        _note(results, log, f"{spec}: the engine could not start, skipped: {_first_line(e)}")
        return
    load_s = time.perf_counter() - loading
    captured = llm.engine.capture_decode_steps()  # compile and capture every bucket: startup, not steps
    results["startup"].append(dict(model=spec, method=sizing, compile_mode=opts.compile_mode if opts.compile_decode
                                   else None, decode_linear=llm.decode_linear, load_s=load_s,
                                   capture_s=dict(captured)))
    log(f"loaded in {load_s:.1f} s; decode steps captured in " + ", ".join(f"{s:.1f} s (batch {b})" for b, s in captured))
    llm.engine.decode_steps = 1  # one decode step per engine step: the step `engine_ms` times
    rows_of_model = []
    with llm:  # stops the workers of a model split over GPUs before the next model loads
        for context in contexts:
            rows = _bench_context(llm, spec, context, methods, options, opts, bandwidth, results, log)
            rows_of_model += rows
            results["rows"] += rows
            if out is not None:
                write_results(results, out)
    for mode, seconds in hf_seconds.items():
        for r in rows_of_model:
            if (r["context"], r["batch"]) == (opts.hf_context, 1):
                r[f"vs_hf_{mode}"] = seconds * 1e3 / r["ms"]
    if out is not None:
        write_results(results, out)
    del llm
    release_memory()


def _method_class(name: str) -> type[DecodeMethod]:
    return SdpaDense if name == SDPA else method_class(name)


def method_options(method: str, budget: int, roles: str | None, real: bool) -> dict[str, Any]:
    """The budget for every method that takes one; `roles` only where the method's default is the
    learned roles (a preset such as tidal's is the method's definition). Without `roles`, random-weight
    shapes, for which no roles can be learned, get RANDOM_SHAPE_ROLES and real models their learned ones."""
    accepted = _method_class(method).defaults
    options: dict[str, Any] = {}
    if "budget" in accepted:
        options["budget"] = budget
    chosen = roles if roles is not None or real else RANDOM_SHAPE_ROLES
    if "roles" in accepted and accepted["roles"] is None and chosen is not None:
        options["roles"] = chosen
    return options


def pool_fit(engine: LLMEngine, context: int, decode_steps: int) -> tuple[int, int]:
    """(max_tokens of a request, how many such requests the KV pool holds) for `context`-token prompts on
    `engine` when every sequence decodes, besides `decode_steps` steps, while the others prefill (the engine
    decodes every sequence whose prefill is done) and for `START_STEPS` steps after."""
    blocks, scheduler = engine.block_manager, engine.scheduler
    usable, chunk = blocks.num_usable_blocks, scheduler.max_num_batched_tokens

    def max_tokens(batch: int) -> int:
        prefill_steps = -(-batch * context // max(1, chunk - batch)) + batch
        return 1 + prefill_steps + START_STEPS + decode_steps + 1  # the prefill's token first, one spare last

    # The bound for the most sequences of bare prompts holds for fewer: their prefill takes fewer steps.
    tokens = max_tokens(min(scheduler.max_num_seqs, usable // blocks.blocks_for(context)))
    return tokens, usable // blocks.blocks_for(context + tokens)


def _bench_context(llm: LLM, spec: str, context: int, methods: list[str], options: dict[str, dict[str, Any]],
                   opts: E2EOptions, bandwidth: float, results: dict[str, Any],
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    engine = llm.engine
    engine_steps = len(opts.batches) * len(methods) * (opts.warmup + opts.steps)  # `engine_ms`, at most
    max_tokens, held = pool_fit(engine, context, engine_steps)
    stats = engine.stats()
    results["pools"].append(dict(model=spec, context=context, blocks=stats["blocks_total"],
                                 block_size=stats["block_size"], decode_tokens=max_tokens, sequences=held))
    log(f"{spec} ctx={context}: the pool ({stats['blocks_total']} blocks of {stats['block_size']} tokens) holds "
        f"{held} sequences of {context} + {max_tokens} tokens")
    fits = min(held, engine.scheduler.max_num_seqs)
    if context + max_tokens > llm.max_context:
        _note(results, log, f"{spec} ctx={context}: skipped, the benchmark decodes up to {max_tokens} tokens per "
                            f"sequence, beyond the engine's {llm.max_context - context}: lower --steps")
        return []
    batches = sorted({fits if b == MAX_BATCH else b for b in opts.batches}, reverse=True)
    for b in batches:
        if b > fits:
            _note(results, log, f"{spec} ctx={context} batch={b}: skipped, the KV pool holds {held} such sequences "
                                "(raise --gpu-memory-utilization)")
    batches = [b for b in batches if 0 < b <= fits]
    if not batches:
        return []
    log(f"{spec} ctx={context}: prefilling {batches[0]} sequences")
    request_ids = _start_decoding(engine, prompts(llm.tokenizer, llm.config.vocab_size, context, batches[0],
                                                  opts.haystack), max_tokens, opts)
    rows = []
    for batch in batches:
        for r in request_ids[batch:]:  # the newest: the batch keeps decode slots 0 .. batch - 1
            engine.abort(r)
        request_ids = request_ids[:batch]
        label = f"{spec} ctx={context} batch={batch}"
        measured = {}
        for m in methods:
            extra = {"length": context + 1} if m == SDPA else {}
            try:
                measured[m] = _measure(llm, m, {**options[m], **extra}, request_ids, context, opts)
            except Exception as e:  # noqa: BLE001 - one method's failure must not discard the others' rows
                if m == "dense":  # every ratio needs it
                    raise
                _note(results, log, f"[{label}] {m} failed: {type(e).__name__}: {e}")
                continue
            t = measured[m].timing
            log(f"[{label}] {m}: {t.median * 1e3:.3f} ms/step (p10 {t.p10 * 1e3:.3f}, p90 {t.p90 * 1e3:.3f})")
        rows += _rows(spec, context, batch, measured, options, llm.config, llm.dtype.itemsize, bandwidth,
                      opts.tensor_parallel_size)
    for r in request_ids:
        engine.abort(r)
    return rows


def _start_decoding(engine: LLMEngine, prompt_ids: list[list[int]], max_tokens: int, opts: E2EOptions
                    ) -> list[str]:
    """Queue one request per prompt (greedy, or sampled as `opts` says, seeded) and step the engine until each
    has its first token, then `START_STEPS` more steps: every sequence then holds the positions the device
    step writes (its prompt length, and the next one in the second step of a paired call). Returns the
    request ids, oldest first."""
    request_ids = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=i,
                                                        temperature=opts.temperature, top_p=opts.top_p))
                   for i, p in enumerate(prompt_ids)]
    waiting = set(request_ids)
    while waiting:
        waiting -= {o.request_id for o in engine.step()}
    for _ in range(START_STEPS):
        engine.step()
    return request_ids


def _use_method(llm: LLM, name: str, options: dict[str, Any]) -> DecodeMethod:
    if name == SDPA:  # benchmark-only: handed to the engine, never registered
        method = SdpaDense(llm.config, **options)
        llm.engine.use_method(method)
        return method
    llm.use_method(name, **options)
    return llm.method


def _measure(llm: LLM, method: str, options: dict[str, Any], request_ids: list[str], context: int,
             opts: E2EOptions) -> Measurement:
    engine = llm.engine
    running = engine.stats()["running"]
    if running != len(request_ids):
        raise RuntimeError(f"{running} sequences are running, not the {len(request_ids)} measured: one was "
                           "preempted or finished")
    instance = _use_method(llm, method, options)
    sequences = [engine.sequences[r] for r in request_ids]

    def rows_at(step: int) -> list[DecodeRow]:
        return [DecodeRow(s.slot, s.output_token_ids[-1], context, step, s.block_table, s.params.temperature,
                          s.params.top_p, seed=s.seed) for s in sequences]

    variants = {}
    for first, count in sorted(Counter(step_kinds(instance, context + 1, VARIANT_WINDOW)).items()):
        timing = _device_step(engine.runner, rows_at, first, opts, llm.device)
        variant = dict(weight=count / VARIANT_WINDOW, kv_rows=instance.kv_tokens_read(context + 1, first),
                       **timing.to_dict())
        if opts.profile and llm.device.type == "cuda":
            kernels = kernel_times(lambda s=first: engine.runner.decode(rows_at(s), 1))
            variant["kernels_us"] = {name: round(sec * 1e6, 2) for name, sec in kernels}
        variants[f"step {first}"] = variant

    def weighted(key: str) -> float:
        return sum(v["weight"] * v[key] for v in variants.values())

    timing = Timing(weighted("median"), weighted("p10"), weighted("p90"), weighted("mean"),
                    sum(int(v["calls"]) for v in variants.values()))
    engine_step = None
    if method != SDPA:
        engine_step = median_time(engine.step, repeats=opts.steps, warmup=opts.warmup, device=llm.device)
    return Measurement(timing, weighted("kv_rows"), variants, engine_step)


def _device_step(runner: ModelRunner, rows_at: Callable[[int], list[DecodeRow]], step: int, opts: E2EOptions,
                 device: torch.device) -> Timing:
    """One decode step of every row, at decode step `step` of each sequence (see the module docstring)."""
    if device.type != "cuda":  # no host-to-device loads or syncs to take out: the one-step call
        return median_time(lambda: runner.decode(rows_at(step), 1), opts.steps, opts.warmup, device)
    return paired_difference(lambda: runner.decode(rows_at(step), 2), lambda: runner.decode(rows_at(step + 1), 1),
                             opts.steps, opts.warmup, device)


def _rows(spec: str, context: int, batch: int, measured: dict[str, Measurement], options: dict[str, dict],
          config: ModelConfig, itemsize: int, bandwidth: float, gpus: int = 1) -> list[dict[str, Any]]:
    # Bytes per GPU: each holds 1/gpus of the weights and reads the KV rows of its 1/gpus of the KV heads.
    weights = config.weight_bytes(itemsize) / gpus
    row_bytes = 2 * config.head_dim * itemsize
    dense = measured["dense"]
    dense_bytes = step_bytes(weights, dense.kv_rows / gpus, row_bytes, batch)
    rows = []
    for method, m in measured.items():
        nbytes = step_bytes(weights, m.kv_rows / gpus, row_bytes, batch)
        engine_ms = host_ms = None
        if m.engine_step is not None:
            common_kind = max(m.variants.values(), key=lambda v: v["weight"])
            engine_ms = m.engine_step.median * 1e3
            host_ms = (m.engine_step.median - common_kind["median"]) * 1e3
        rows.append(dict(
            model=spec, gpus=gpus, context=context, batch=batch, method=method,
            options=" ".join(f"{k}={v}" for k, v in options[method].items()),
            **derive(m.timing, nbytes, batch, dense.timing.median, dense_bytes, bandwidth),
            engine_ms=engine_ms, host_ms=host_ms, kv_rows=m.kv_rows, variants=m.variants,
        ))
    return rows


# -- transformers' generate ---------------------------------------------------------------------
def _hf_baseline(spec: str, config: ModelConfig, tokenizer: Any, contexts: list[int], opts: E2EOptions,
                 device: torch.device, dtype: torch.dtype, results: dict[str, Any],
                 log: Callable[[str], None]) -> dict[str, float]:
    """Seconds per decode step of transformers' `generate` at `hf_context`, batch 1, per mode; on a load of
    the weights of its own, freed before the engine takes the memory."""
    context = opts.hf_context
    if context not in contexts or 1 not in opts.batches:
        _note(results, log, f"{spec}: transformers baseline skipped, no batch-1 row at context {context}")
        return {}
    log(f"loading {spec} for transformers")
    loaded = load_model(spec, device, dtype)
    # static cache, and the prefill's [context, context] mask and MLP activations
    need = config.kv_bytes_per_token(dtype.itemsize) * (context + opts.steps + 1)
    need += context * (context + 8 * config.intermediate_size) * dtype.itemsize + HEADROOM_BYTES
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    seconds = {}
    if free is not None and need > free:
        _note(results, log, f"{spec}: transformers baseline skipped, needs ~{need / 1e9:.1f} GB, "
                            f"{free / 1e9:.1f} GB free")
    else:
        ids = torch.tensor(prompts(tokenizer, config.vocab_size, context, 1, opts.haystack), device=device)
        hf = hf_model_like(loaded.model)
        for mode in opts.hf_modes:
            log(f"[{spec} ctx={context} batch=1] transformers generate ({mode})")
            try:
                seconds[mode] = hf_step_seconds(hf, ids, opts.steps, compiled=mode == "compiled")
            except Exception as e:  # noqa: BLE001 - an optional baseline must not discard the measured rows
                _note(results, log, f"{spec}: transformers generate ({mode}) failed: {type(e).__name__}: {e}")
                continue
            results["hf"].append(dict(model=spec, context=context, batch=1, mode=mode, ms=seconds[mode] * 1e3))
            log(f"[{spec} ctx={context} batch=1] transformers generate ({mode}): {seconds[mode] * 1e3:.3f} ms/step")
        del hf
    del loaded
    release_memory()
    return seconds


def hf_model_like(model: Transformer) -> torch.nn.Module:
    """transformers' own model (SDPA attention) of `model`'s architecture whose parameters are views of
    its weights: the very same weights, no second load and no extra memory."""
    from transformers import AutoModelForCausalLM

    weight = model.embed_tokens.weight
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(copy.deepcopy(model.config.hf_config), dtype=weight.dtype,
                                              attn_implementation="sdpa")
    hf.load_state_dict(_hf_state_dict(model), strict=True, assign=True)
    with torch.device(weight.device):  # the rotary tables are computed, not loaded
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    return hf.eval()


def _hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """transformers' parameter names for the engine's weights, un-fusing q/k/v and gate/up as views."""
    return to_transformers(model.state_dict(), model.config)


def hf_step_seconds(hf: torch.nn.Module, ids: torch.Tensor, steps: int, compiled: bool) -> float:
    """Seconds per decode step of transformers' `generate` with a static cache; `compiled` keeps
    transformers' default on CUDA (its decode step compiled by torch.compile); otherwise eager."""
    return generate_step_seconds(hf, ids, steps, warm_up_whole=compiled, cache_implementation="static",
                                 disable_compile=not compiled)


class StepClock:
    """A logits processor that notes the time at each generated token, after the device's queued work."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def generate_step_seconds(hf: torch.nn.Module, ids: torch.Tensor, steps: int, warm_up_whole: bool = False,
                          **generate_kwargs: Any) -> float:
    """Median seconds per decode step of greedy `generate(ids, **generate_kwargs)`: the intervals between
    consecutive tokens' logits after the first (which the prefill gives). A warm-up call first runs on
    the prompt's first 256 tokens, or on the whole prompt with `warm_up_whole` (a compiled step, whose
    graphs and static cache depend on the length)."""
    from transformers import LogitsProcessorList

    kwargs = dict(do_sample=False, pad_token_id=0, **generate_kwargs)
    warm = ids if warm_up_whole else ids[:, :256]
    hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=steps + 1 if warm_up_whole else 3,
                min_new_tokens=steps + 1 if warm_up_whole else 3, **kwargs)
    clock = StepClock(ids.device)
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                logits_processor=LogitsProcessorList([clock]), **kwargs)
    return float(np.median(np.diff(clock.times)))


# -- output -------------------------------------------------------------------------------------
TABLE_COLUMNS = {  # table header -> row key
    "model": "model", "GPUs": "gpus", "ctx": "ctx", "B": "batch", "method": "method", "ms/step": "ms", "p10-p90 ms": "spread",
    "engine ms": "engine_ms", "host ms": "host_ms", "tok/s": "tokens_per_s", "GB/s": "gbps", "floor ms": "floor_ms", "time/floor": "time_over_floor",
    "x dense": "speedup", "ceiling": "ceiling", "of ceiling": "ceiling_fraction",
    "x HF eager": "vs_hf_eager", "x HF compiled": "vs_hf_compiled",
}


def _sampling(meta: dict[str, Any]) -> str:
    temperature, top_p = meta.get("temperature", 0.0), meta.get("top_p", 1.0)
    if not temperature:
        return "greedy"
    return f"sampled at temperature {temperature}" + (f", top-p {top_p}" if top_p < 1 else "")


def results_markdown(results: dict[str, Any]) -> str:
    """The results table (and the transformers baselines and notes) as markdown."""
    meta = results["meta"]
    table_rows = [
        {header: _table_value(r, key) for header, key in TABLE_COLUMNS.items()} for r in results["rows"]
    ]
    columns = [h for h in TABLE_COLUMNS if any(t[h] is not None for t in table_rows)]  # no empty HF columns
    if all(r.get("gpus", 1) == 1 for r in results["rows"]):
        columns = [h for h in columns if h != "GPUs"]
    parts = [
        "# sparsedecode end-to-end decode benchmark",
        f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}. "
        f"Copy bandwidth {meta['copy_bandwidth'] / 1e12:.3f} TB/s (read + write). Median of {meta['steps']} "
        f"decode steps (CUDA graphs on GPU) after {meta['warmup']} warm-up steps; {_sampling(meta)}; "
        f"budget {meta['budget']}, "
        f"roles {meta['roles'] or RANDOM_SHAPE_ROLES + ' on random-weight shapes, the learned roles on real models'}.",
        "ms/step = the engine runner's decode step at the context (on GPU without loading its rows and the "
        "host sync); engine ms = `engine.step()`, scheduler and bookkeeping included; host ms = engine ms - "
        "the step of the method's most common kind; "
        "floor = (weights + KV read) / copy bandwidth, per GPU for a model split over several (GPUs): "
        "(weights + KV read) / GPUs; x dense = our dense step / this step (same run); "
        "ceiling = dense bytes / these bytes; of ceiling = x dense / ceiling; x HF = transformers "
        "`generate` step (static cache, SDPA; median interval between its tokens) / this step.",
        markdown_table(table_rows, columns),
    ]
    if results.get("pools"):
        pool_rows = [{"model": p["model"], "ctx": token_count_label(p["context"]), "blocks": p["blocks"],
                      "block tokens": p["block_size"], "decoded (at most)": p["decode_tokens"],
                      "sequences": p["sequences"]} for p in results["pools"]]
        parts += ["## KV pool",
                  "How many sequences of ctx prompt tokens plus the tokens the benchmark decodes the engine's pool "
                  "holds; `--batches max` takes that many, up to the engine's decode slots.", markdown_table(pool_rows)]
    if results.get("startup"):
        startup_rows = [{"model": u["model"], "method": u["method"], "compile mode": u["compile_mode"] or "off",
                         "linear layers": u.get("decode_linear", "torch"),
                         "load s": f"{u['load_s']:.1f}",
                         "capture s (batch: s)": ", ".join(f"{b}: {s:.1f}" for b, s in u["capture_s"].items()) or "-"}
                        for u in results["startup"]]
        parts += ["## Startup",
                  "Loading the engine (weights, KV pool), then compiling and capturing its decode step at every "
                  "batch-size bucket (greedy, sampled and filtered graphs), as `LLMEngine.capture_decode_steps` "
                  "does at server start.", markdown_table(startup_rows)]
    if results["hf"]:
        hf_rows = [{"model": h["model"], "ctx": token_count_label(h["context"]), "B": h["batch"], "mode": h["mode"],
                    "HF ms/step": h["ms"]} for h in results["hf"]]
        parts += ["## transformers generate", markdown_table(hf_rows)]
    for r in results["rows"]:
        for variant, v in r["variants"].items():
            if "kernels_us" in v:
                title = f"## Kernels of one step: {r['model']} {token_count_label(r['context'])} B{r['batch']} {r['method']}"
                top = list(v["kernels_us"].items())[:PROFILE_TOP]
                rest = sum(v["kernels_us"].values()) - sum(us for _, us in top)
                kernels = [{"kernel": name[:70], "us": f"{us:.1f}"} for name, us in top]
                kernels.append({"kernel": "(all others)", "us": f"{rest:.1f}"})
                parts += [f"{title} (the kind of {variant}; device us per step, most first)", markdown_table(kernels)]
    if results["notes"]:
        parts += ["## Notes", "\n".join(f"- {n}" for n in results["notes"])]
    return "\n\n".join(parts) + "\n"


def _table_value(row: dict[str, Any], key: str) -> Any:
    if key == "ctx":
        return token_count_label(row["context"])
    if key == "spread":
        return f"{format_cell(row['p10_ms'])}-{format_cell(row['p90_ms'])}"
    if key == "ceiling_fraction":
        return f"{row[key]:.0%}"
    return row.get(key)


def write_results(results: dict[str, Any], out: Path) -> None:
    """results.json, results.md, speedup_vs_context.png and time_vs_floor.png in `out`, each atomically."""
    out = Path(out)
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    write_atomic(out / "results.md", results_markdown(results))
    if results["rows"]:
        plot_speedup_vs_context(results["rows"], out / "speedup_vs_context.png")
        plot_time_vs_floor(results["rows"], out / "time_vs_floor.png")
