"""End-to-end decode benchmark: one decode step of the whole model (weights and attention) per method,
against its bytes floor, our dense step measured in the same run, and transformers' own `generate`.

How a row is measured:

- Random-weight shapes: the KV cache is filled with random normal values for `context` tokens instead
  of a prefill (speed does not depend on the values; a real 128K prefill of an 8B model costs tens of
  seconds). Real-weight models: a real prompt (the haystack essays) is prefilled for sequence 0 and its
  cache rows are copied to the other sequences of the batch.
- Each method is set up through the engine's own paths (`LLM.use_method`, `LLM._cache_for`, which plans
  it on the filled cache, `after_prefill` per layer and sequence); then decode steps at position
  `context` go through `LLM._decode`, the CUDA graph `generate` replays, each timed between two CUDA
  events after a warm-up (whose first step captures the graph). Every timed step replays the same
  position, so every step sees the same context.
- A method whose steps come in kinds (`step_variant`, e.g. a periodic dense step) is timed per kind; its
  step time is the median of each kind weighted by how often the kind occurs in `VARIANT_WINDOW` steps.
- Bytes per step = weights + batch * KV rows the method reads (`kv_tokens_read`) * bytes per row.
  Floor = bytes / copy bandwidth measured in the same run (read + write bytes per second). Ceiling =
  dense bytes / method bytes: the speedup over dense if both ran at the same bandwidth.
"""
from __future__ import annotations

import copy
import gc
import json
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.haystack import haystack_text
from ..engine.kv_cache import KVCache
from ..engine.llm import CAPACITY_MULTIPLE, LLM
from ..methods import available  # noqa: F401  (registers every method, so METHODS is complete)
from ..methods.base import METHODS, DecodeMethod, register
from ..models.config import ModelConfig
from ..models.loader import default_device
from ..models.transformer import Transformer
from .common import (
    Timing,
    format_cell,
    kernel_times,
    markdown_table,
    measure_copy_bandwidth,
    median_time,
    plot_speedup_vs_context,
    plot_time_vs_floor,
    synchronize,
    write_atomic,
)

SDPA = "sdpa"
VARIANT_WINDOW = 4096  # decode steps over which step-kind frequencies are counted
METHOD_STATE_FRACTION = 0.1  # method state beside the cache (Quest's page min/max keys are 1/16 of it)
PROFILE_TOP = 12  # kernels listed per profiled step
HEADROOM_BYTES = 2 << 30  # activations, graph pools and kernel scratch
HF_REPEATS = 2  # generate calls per length; their minimum counts


@register
class SdpaDense(DecodeMethod):
    """Dense decode attention through PyTorch SDPA (FlashAttention with GQA) over exactly `length` cached
    tokens. For this benchmark only: the length is fixed when the step is captured in a CUDA graph,
    which holds here because every timed step replays the same position."""

    name = SDPA
    defaults = dict(length=None)

    def __init__(self, config: ModelConfig, **options: Any) -> None:
        super().__init__(config, **options)
        if self.options["length"] is None:
            raise ValueError(f"method {SDPA!r} is for benchmarks only: give length=<tokens attended>")

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor) -> torch.Tensor:
        n = self.options["length"]
        k, v = cache.k[layer, :, :, :n], cache.v[layer, :, :, :n]
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=self.scale, enable_gqa=True)[:, :, 0]


@dataclass
class E2EOptions:
    models: list[str]
    contexts: list[int]
    batches: list[int]
    methods: list[str]
    budget: int = 4096
    roles: str | None = "random:24"  # for random-weight shapes; real models use the method's default
    steps: int = 30
    warmup: int = 5
    hf_modes: tuple[str, ...] = ("eager", "compiled")  # transformers baselines; empty for none
    hf_context: int = 32768
    hf_random_shapes: bool = False  # also compare random-weight shapes with transformers (real prefill)
    haystack: str | None = None  # the prompt text source of real models (default: the essays)
    device: str | None = None
    compile_decode: bool = True  # False: the engine's element-wise work unfused (to measure what fusing gives)
    profile: bool = False  # also record the device time per kernel of one step of each method (CUDA)


@dataclass
class Measurement:
    timing: Timing  # per decode step, weighted over step kinds
    kv_rows: float  # KV rows one sequence reads per step, weighted the same way
    variants: dict[str, dict[str, float]] = field(default_factory=dict)


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
    """Run the benchmark; with `out`, rewrite results.json, results.md and the plots there after each model."""
    start = time.perf_counter()
    log = _timestamped(log, start)
    device = torch.device(opts.device) if opts.device else default_device()
    log(f"measuring copy bandwidth on {device}")
    bandwidth = measure_copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)")
    results: dict[str, Any] = {"meta": _meta(opts, device, bandwidth), "rows": [], "hf": [], "notes": []}
    methods = list(dict.fromkeys(["dense", *opts.methods]))  # dense first: every ratio needs it
    for name in methods:
        if name not in METHODS:
            _note(results, log, f"method {name!r} is not registered in this build: skipped")
    methods = [m for m in methods if m in METHODS]
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
        hf_context=opts.hf_context, compile_decode=opts.compile_decode, date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def _note(results: dict[str, Any], log: Callable[[str], None], text: str) -> None:
    results["notes"].append(text)
    log("note: " + text)


def _bench_model(spec: str, methods: list[str], opts: E2EOptions, device: torch.device, bandwidth: float,
                 results: dict[str, Any], out: Path | None, log: Callable[[str], None]) -> None:
    log(f"loading {spec}")
    try:
        llm = LLM(spec, method="dense", device=device, compile_decode=opts.compile_decode)
    except Exception as e:  # noqa: BLE001 - a model that cannot load (not pulled, no network) must not end the run
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _note(results, log, f"{spec}: could not be loaded, skipped: {type(e).__name__}: {first_line}")
        return
    config, real = llm.config, llm.tokenizer is not None
    contexts = opts.contexts
    if real:  # beyond its trained length a prompt is meaningless and its real prefill costly
        contexts = [c for c in contexts if c <= config.max_position_embeddings]
        if len(contexts) < len(opts.contexts):
            _note(results, log, f"{spec}: contexts above its trained {config.max_position_embeddings} skipped")
    options = {m: _options_for(m, opts, real) for m in methods}
    usable = []
    for m in methods:
        try:  # refuse a method that cannot run on this shape now, not after minutes of measurements
            llm.use_method(m, **options[m], **({"length": 1} if m == SDPA else {}))
            usable.append(m)
        except (ValueError, TypeError) as e:
            _note(results, log, f"{spec}: {m} skipped: {e}")
    prompt = _prompt_ids(llm, max(contexts), opts.haystack) if real and contexts else None
    rows_of_model = []
    for context in contexts:
        for batch in opts.batches:
            label = f"{spec} ctx={context} batch={batch}"
            capacity = KVCache.capacity_for(context + 1, CAPACITY_MULTIPLE)
            need = config.kv_bytes_per_token(llm.dtype.itemsize) * capacity * batch
            free = _free_memory(llm)
            if free is not None and need * (1 + METHOD_STATE_FRACTION) + HEADROOM_BYTES > free:
                _note(results, log, f"{label}: skipped, the KV cache needs {need / 1e9:.1f} GB, "
                                    f"{free / 1e9:.1f} GB free")
                continue
            tokens = _fill_cache(llm, llm._cache_for(batch, capacity), context, prompt)
            measured = {}
            for m in usable:
                extra = {"length": context + 1} if m == SDPA else {}
                try:
                    measured[m] = _measure(llm, m, {**options[m], **extra}, batch, capacity, context, tokens, opts)
                except Exception as e:  # noqa: BLE001 - one method's failure must not discard the others' rows
                    if m == "dense":  # every ratio needs it
                        raise
                    _note(results, log, f"[{label}] {m} failed: {type(e).__name__}: {e}")
                    continue
                log(f"[{label}] {m}: {measured[m].timing.median * 1e3:.3f} ms/step "
                    f"(p10 {measured[m].timing.p10 * 1e3:.3f}, p90 {measured[m].timing.p90 * 1e3:.3f})")
            rows = _rows(spec, context, batch, measured, options, config, llm.dtype.itemsize, bandwidth)
            rows_of_model += rows
            results["rows"] += rows
    if out is not None:
        write_results(results, out)
    if opts.hf_modes and (real or opts.hf_random_shapes):
        _hf_baseline(llm, spec, rows_of_model, prompt, opts, results, log)
        if out is not None:
            write_results(results, out)
    del llm
    _release_memory()


def _options_for(method: str, opts: E2EOptions, real: bool) -> dict[str, Any]:
    """The budget for every method that takes one; `roles` only where the method's default is the
    learned roles (a preset such as tidal's is the method's definition) and only for random-weight
    shapes, for which no roles can be learned."""
    accepted = METHODS[method].defaults
    options: dict[str, Any] = {}
    if "budget" in accepted:
        options["budget"] = opts.budget
    if "roles" in accepted and accepted["roles"] is None and not real and opts.roles is not None:
        options["roles"] = opts.roles
    return options


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _free_memory(llm: LLM) -> int | None:
    """Drop the cache, the graphs and the method state, then the free device memory in bytes (None off CUDA)."""
    llm.cache = None
    llm.use_method("dense")
    _release_memory()
    return torch.cuda.mem_get_info(llm.device)[0] if llm.device.type == "cuda" else None


def _prompt_ids(llm: LLM, length: int, source: str | None) -> list[int]:
    """`length` tokens of the haystack text, repeated if it is shorter."""
    text = haystack_text(source)[: 8 * length]  # tokens are ~4 characters: do not tokenise all of it
    ids = llm.tokenizer(text, add_special_tokens=False).input_ids
    return (ids * -(-length // len(ids)))[:length]


def _fill_cache(llm: LLM, cache: KVCache, context: int, prompt: list[int] | None) -> torch.Tensor:
    """Fill `context` tokens of every sequence; returns the next token of each sequence [batch]."""
    batch = cache.batch_size
    generator = torch.Generator(device=llm.device).manual_seed(0)
    if prompt is None:
        cache.k.normal_(generator=generator)
        cache.v.normal_(generator=generator)
        return torch.randint(1, llm.config.vocab_size, (batch,), generator=generator, device=llm.device)
    with torch.inference_mode():
        hidden = llm._prefill(prompt[:context], 0, cache)
        token = llm.model.logits(hidden).argmax()
    cache.k[:, 1:] = cache.k[:, :1]
    cache.v[:, 1:] = cache.v[:, :1]
    return token.expand(batch).clone()


def _measure(llm: LLM, method: str, options: dict[str, Any], batch: int, capacity: int, context: int,
             tokens: torch.Tensor, opts: E2EOptions) -> Measurement:
    llm.use_method(method, **options)
    cache = llm._cache_for(batch, capacity)  # the filled cache: same shape, so only the method is planned
    for layer in range(llm.config.num_layers):
        for b in range(batch):
            llm.method.after_prefill(layer, cache, b, context)
    positions = torch.full((batch,), context, dtype=torch.long, device=llm.device)
    kinds = Counter(llm.method.step_variant(s) for s in range(VARIANT_WINDOW))
    variants = {}
    for variant, count in kinds.items():
        timing = median_time(lambda v=variant: llm._decode(v, tokens, positions, cache),
                             repeats=opts.steps, warmup=opts.warmup, device=llm.device)
        rows = llm.method.kv_tokens_read(context + 1, variant)
        variants[variant] = dict(weight=count / VARIANT_WINDOW, kv_rows=rows, **timing.to_dict())
        if opts.profile and llm.device.type == "cuda":
            kernels = kernel_times(lambda v=variant: llm._decode(v, tokens, positions, cache))
            variants[variant]["kernels_us"] = {name: round(sec * 1e6, 2) for name, sec in kernels}

    def weighted(key: str) -> float:
        return sum(v["weight"] * v[key] for v in variants.values())

    timing = Timing(weighted("median"), weighted("p10"), weighted("p90"), weighted("mean"),
                    sum(int(v["calls"]) for v in variants.values()))
    return Measurement(timing, weighted("kv_rows"), variants)


def _rows(spec: str, context: int, batch: int, measured: dict[str, Measurement], options: dict[str, dict],
          config: ModelConfig, itemsize: int, bandwidth: float) -> list[dict[str, Any]]:
    weights = config.weight_bytes(itemsize)
    row_bytes = 2 * config.head_dim * itemsize
    dense = measured["dense"]
    dense_bytes = step_bytes(weights, dense.kv_rows, row_bytes, batch)
    rows = []
    for method, m in measured.items():
        nbytes = step_bytes(weights, m.kv_rows, row_bytes, batch)
        rows.append(dict(
            model=spec, context=context, batch=batch, method=method,
            options=" ".join(f"{k}={v}" for k, v in options[method].items()),
            **derive(m.timing, nbytes, batch, dense.timing.median, dense_bytes, bandwidth),
            kv_rows=m.kv_rows, variants=m.variants,
        ))
    return rows


# -- transformers' generate ---------------------------------------------------------------------
def _hf_baseline(llm: LLM, spec: str, rows: list[dict[str, Any]], prompt: list[int] | None, opts: E2EOptions,
                 results: dict[str, Any], log: Callable[[str], None]) -> None:
    context = opts.hf_context
    ours = [r for r in rows if r["context"] == context and r["batch"] == 1]
    if not ours:
        _note(results, log, f"{spec}: transformers baseline skipped, no batch-1 row at context {context}")
        return
    config = llm.config
    free = _free_memory(llm)
    # static cache, and the prefill's [context, context] mask and MLP activations
    need = config.kv_bytes_per_token(llm.dtype.itemsize) * (context + opts.steps + 1)
    need += context * (context + 8 * config.intermediate_size) * llm.dtype.itemsize + HEADROOM_BYTES
    if free is not None and need > free:
        _note(results, log, f"{spec}: transformers baseline skipped, needs ~{need / 1e9:.1f} GB, "
                            f"{free / 1e9:.1f} GB free")
        return
    if prompt is None:
        generator = torch.Generator(device=llm.device).manual_seed(0)
        ids = torch.randint(1, config.vocab_size, (1, context), generator=generator, device=llm.device)
    else:
        ids = torch.tensor([prompt[:context]], device=llm.device)
    hf = hf_model_like(llm)
    for mode in opts.hf_modes:
        log(f"[{spec} ctx={context} batch=1] transformers generate ({mode})")
        try:
            seconds = hf_step_seconds(hf, ids, opts.steps, compiled=mode == "compiled")
        except Exception as e:  # noqa: BLE001 - an optional baseline must not discard the measured rows
            _note(results, log, f"{spec}: transformers generate ({mode}) failed: {type(e).__name__}: {e}")
            continue
        results["hf"].append(dict(model=spec, context=context, batch=1, mode=mode, ms=seconds * 1e3))
        log(f"[{spec} ctx={context} batch=1] transformers generate ({mode}): {seconds * 1e3:.3f} ms/step")
        for r in ours:
            r[f"vs_hf_{mode}"] = seconds * 1e3 / r["ms"]
    del hf
    _release_memory()


def hf_model_like(llm: LLM) -> torch.nn.Module:
    """transformers' own model (SDPA attention) of `llm`'s architecture whose parameters are views of
    the engine's weights: the very same weights, no second load and no extra memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(copy.deepcopy(llm.config.hf_config), dtype=llm.dtype,
                                              attn_implementation="sdpa")
    hf.load_state_dict(_hf_state_dict(llm.model), strict=True, assign=True)
    with torch.device(llm.device):  # the rotary tables are computed, not loaded
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    return hf.eval()


def _hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """transformers' parameter names for the engine's weights, un-fusing q/k/v and gate/up as views."""
    c = model.config
    split = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
    state = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for n, w in zip("qkv", layer.qkv_proj.weight.split(split), strict=True):
            state[p + f"self_attn.{n}_proj.weight"] = w
        if c.qkv_bias:
            for n, b in zip("qkv", layer.qkv_proj.bias.split(split), strict=True):
                state[p + f"self_attn.{n}_proj.bias"] = b
        state[p + "self_attn.o_proj.weight"] = layer.o_proj.weight
        if c.o_bias:
            state[p + "self_attn.o_proj.bias"] = layer.o_proj.bias
        state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"] = layer.gate_up_proj.weight.chunk(2)
        state[p + "mlp.down_proj.weight"] = layer.down_proj.weight
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[p + f"{norm}.weight"] = getattr(layer, norm).weight
        if c.qk_norm:
            state[p + "self_attn.q_norm.weight"] = layer.q_norm.weight
            state[p + "self_attn.k_norm.weight"] = layer.k_norm.weight
    return {k: v.detach() for k, v in state.items()}


def hf_step_seconds(hf: torch.nn.Module, ids: torch.Tensor, steps: int, compiled: bool) -> float:
    """Seconds per decode step of transformers' `generate` (greedy, static cache, SDPA): the time of
    steps + 1 new tokens minus the time of 1 new token, over `steps`. Both calls prefill the same
    prompt and pick the first token from it, so the difference is `steps` decode steps. `compiled`
    keeps transformers' default on CUDA (its decode step compiled by torch.compile); otherwise eager."""
    kwargs = dict(do_sample=False, cache_implementation="static", disable_compile=not compiled,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)

    def run(new_tokens: int) -> float:
        synchronize(ids.device)
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        synchronize(ids.device)
        return time.perf_counter() - start

    run(steps + 1)  # warm-up: compiles if asked, and sizes the static cache every later call reuses
    # the minimum over repeats: wall-clock noise only ever adds
    many = min(run(steps + 1) for _ in range(HF_REPEATS))
    one = min(run(1) for _ in range(HF_REPEATS))
    return (many - one) / steps


# -- output -------------------------------------------------------------------------------------
TABLE_COLUMNS = {  # table header -> row key
    "model": "model", "ctx": "ctx", "B": "batch", "method": "method", "ms/step": "ms", "p10-p90 ms": "spread",
    "tok/s": "tokens_per_s", "GB/s": "gbps", "floor ms": "floor_ms", "time/floor": "time_over_floor",
    "x dense": "speedup", "ceiling": "ceiling", "of ceiling": "ceiling_fraction",
    "x HF eager": "vs_hf_eager", "x HF compiled": "vs_hf_compiled",
}


def _tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def results_markdown(results: dict[str, Any]) -> str:
    """The results table (and the transformers baselines and notes) as markdown."""
    meta = results["meta"]
    table_rows = [
        {header: _table_value(r, key) for header, key in TABLE_COLUMNS.items()} for r in results["rows"]
    ]
    columns = [h for h in TABLE_COLUMNS if any(t[h] is not None for t in table_rows)]  # no empty HF columns
    parts = [
        "# sparsedecode end-to-end decode benchmark",
        f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}. "
        f"Copy bandwidth {meta['copy_bandwidth'] / 1e12:.3f} TB/s (read + write). Median of {meta['steps']} "
        f"decode steps (CUDA graphs on GPU) after {meta['warmup']} warm-up steps; budget {meta['budget']}, "
        f"roles {meta['roles']} (random-weight shapes).",
        "floor = (weights + KV read) / copy bandwidth; x dense = our dense step / this step (same run); "
        "ceiling = dense bytes / these bytes; of ceiling = x dense / ceiling; x HF = transformers "
        "`generate` step (static cache, SDPA; (time of N+1 tokens - time of 1) / N) / this step.",
        markdown_table(table_rows, columns),
    ]
    if results["hf"]:
        hf_rows = [{"model": h["model"], "ctx": _tokens_label(h["context"]), "B": h["batch"], "mode": h["mode"],
                    "HF ms/step": h["ms"]} for h in results["hf"]]
        parts += ["## transformers generate", markdown_table(hf_rows)]
    for r in results["rows"]:
        for variant, v in r["variants"].items():
            if "kernels_us" in v:
                title = f"## Kernels of one step: {r['model']} {_tokens_label(r['context'])} B{r['batch']} {r['method']}"
                top = list(v["kernels_us"].items())[:PROFILE_TOP]
                rest = sum(v["kernels_us"].values()) - sum(us for _, us in top)
                lines = [f"| {name[:70]} | {us:.1f} |" for name, us in top] + [f"| (all others) | {rest:.1f} |"]
                parts += [f"{title} ({variant} step; device us per step, most first)",
                          "| kernel | us |\n|---|---|\n" + "\n".join(lines)]
    if results["notes"]:
        parts += ["## Notes", "\n".join(f"- {n}" for n in results["notes"])]
    return "\n\n".join(parts) + "\n"


def _table_value(row: dict[str, Any], key: str) -> Any:
    if key == "ctx":
        return _tokens_label(row["context"])
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
