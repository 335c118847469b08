"""`sparsedecode bench`: the kernel benchmark, the end-to-end decode benchmark, the serving benchmark, the LFPS
and KV-offload measurements (`lfps-recall`, `lfps-index`, `offload`, `offload-hits`, `offload-serve`,
`lfps-check`) and the engine check."""
from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..models import DECODE_COMPILE_MODES, DECODE_LINEARS
from ..utils.tokens import parse_token_count as parse_tokens

if TYPE_CHECKING:
    from ..offload import OffloadConfig

DEFAULT_MODELS = "random:llama-3.1-8b,random:qwen3-8b,qwen2.5-coder-1.5b"
DEFAULT_METHODS = "dense,lychee,tidal,quest,lfps,lychee+lfps"
HF_MODES = ("eager", "compiled")
def _items(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _contexts(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        contexts = sorted({parse_tokens(t) for t in _items(value)})
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if not contexts:
        raise click.BadParameter("give at least one context")
    return contexts


def _context(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_tokens(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _prefix(ctx: click.Context, param: click.Parameter, value: str) -> int:
    return 0 if value.strip() == "0" else _context(ctx, param, value)


def _batches(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    items = _items(value)
    if not items or not all(t.isdigit() and int(t) > 0 for t in items):
        raise click.BadParameter(f"{value!r}: give positive batch sizes separated by commas, such as 1,4,8")
    return sorted({int(t) for t in items})


def _e2e_batches(ctx: click.Context, param: click.Parameter, value: str) -> list[int | str]:
    from .e2e import MAX_BATCH

    items = _items(value)
    if not items or not all(t == MAX_BATCH or (t.isdigit() and int(t) > 0) for t in items):
        raise click.BadParameter(f"{value!r}: give positive batch sizes and/or {MAX_BATCH} separated by commas, "
                                 "such as 1,4,max")
    return sorted({int(t) for t in items if t != MAX_BATCH}) + ([MAX_BATCH] if MAX_BATCH in items else [])


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    items = _items(value)
    if not items or not all(t.isdigit() for t in items):
        raise click.BadParameter(f"{value!r}: give integers separated by commas, such as 0,1")
    return tuple(int(t) for t in items)


def _methods(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from ..methods import METHODS
    from .e2e import SDPA

    known = sorted({*METHODS, SDPA})
    methods = list(dict.fromkeys(_items(value)))
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise click.BadParameter(f"unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return methods


def _models(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from ..models.registry import MODELS
    from ..models.shapes import RANDOM_PREFIX, SHAPES

    models = list(dict.fromkeys(_items(value)))
    for m in models:
        if m.startswith(RANDOM_PREFIX):
            if m[len(RANDOM_PREFIX):] not in SHAPES:
                raise click.BadParameter(f"unknown random-weight shape {m!r}; known: "
                                         f"{', '.join(RANDOM_PREFIX + s for s in SHAPES)}")
        elif m not in MODELS and not Path(m).expanduser().exists():
            raise click.BadParameter(f"{m!r} is neither a random-weight shape, a registry model "
                                     f"({', '.join(MODELS)}) nor an existing path")
    if not models:
        raise click.BadParameter("give at least one model")
    return models


def _model(ctx: click.Context, param: click.Parameter, value: str) -> str:
    models = _models(ctx, param, value)
    if len(models) > 1:
        raise click.BadParameter(f"{value!r}: give one model")
    return models[0]


def _hf_modes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(_items(value)))
    if not modes or any(m not in HF_MODES for m in modes):
        raise click.BadParameter(f"{value!r}: give one or both of {', '.join(HF_MODES)}")
    return modes


def _launches(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple:
    from ..kernels.sparse_decode import Launch

    fields = [f.name for f in dataclasses.fields(Launch)]  # all integers
    launches = []
    for text in value:
        settings = {}
        for item in _items(text):
            name, _, raw = item.partition("=")
            if name not in fields or not raw:
                raise click.BadParameter(f"{item!r}: give FIELD=VALUE with FIELD one of {', '.join(fields)}")
            try:
                settings[name] = int(raw)
            except ValueError:
                raise click.BadParameter(f"{item!r}: {name} is an integer") from None
        try:
            launches.append(Launch(**settings))
        except ValueError as e:
            raise click.BadParameter(f"{text!r}: {e}") from None
    return tuple(launches)


@click.group("bench")
def bench_group() -> None:
    """Benchmarks: the decode-attention kernel, the whole decode step, serving load, LFPS and KV offload, and
    the engine check."""


@bench_group.command("kernel")
@click.option("--contexts", default="32k,128k", show_default=True, callback=_contexts, help="Context lengths.")
@click.option("--batches", default="1,8", show_default=True, callback=_batches)
@click.option("--tune", is_flag=True, help="Instead of the table, search the kernels' launch settings (tiles, "
              "warps, pipelining, chunking) on fixed cases and print every setting tried.")
@click.option("--flashinfer/--no-flashinfer", default=None,
              help="Add FlashInfer's paged decode and block-sparse rows (default: when flashinfer imports).")
@click.option("--select", "select", is_flag=True, help="Instead of the table, time the block selection kernel "
              "(several warp counts) on Quest's, Lychee's and LFPS's top-k.")
@click.option("--prefill", "prefill", is_flag=True, help="Instead of the table, time a prompt chunk's attention "
              "over its paged prefix: the paged prefill kernel (several launch settings) against PyTorch SDPA.")
@click.option("--gemv", "gemv", is_flag=True, help="Instead of the table, time the decode step's linear layers "
              "(Llama-3.1-8B shapes, 1 and 8 rows): cuBLAS against the few-row kernel at several launch settings.")
@click.option("--launch", "launches", multiple=True, callback=_launches, metavar="FIELD=VALUE,...",
              help="Also time our kernels under these `Launch` settings (repeatable), e.g. "
              "'num_stages=3,num_warps=8': rows 'ours dense [num_warps=8, num_stages=3]' beside the defaults'.")
def kernel(contexts: list[int], batches: list[int], tune: bool, flashinfer: bool | None, select: bool,
           prefill: bool, gemv: bool, launches: tuple) -> None:
    """One decode-attention layer (Llama-3.1-8B shapes): PyTorch SDPA and FlashInfer against our dense and hybrid
    kernel."""
    import torch

    if not torch.cuda.is_available():  # it times Triton kernels on the device: nothing to measure without one
        raise click.ClickException("bench kernel times the GPU kernels: it needs a CUDA GPU, and torch sees none here")
    from . import kernel_bench

    if tune:
        kernel_bench.tune()
    elif select:
        kernel_bench.select_rows(tuple(contexts), tuple(batches))
    elif prefill:
        kernel_bench.prefill_rows()
    elif gemv:
        kernel_bench.gemv_rows()
    else:
        kernel_bench.run(tuple(contexts), tuple(batches), flashinfer=flashinfer, launches=launches)


@bench_group.command("e2e")
@click.option("--models", default=DEFAULT_MODELS, show_default=True, callback=_models,
              help="Comma-separated: random:<shape> (random weights), registry names, GGUF files or model folders.")
@click.option("--contexts", default="4k,32k,128k,256k", show_default=True, callback=_contexts,
              help="Context lengths (4096, 4k, 1m); real-weight models stop at their trained length.")
@click.option("--batches", default="1,4,8", show_default=True, callback=_e2e_batches,
              help="Batch sizes; max: the most sequences of the context that the KV pool holds. A batch the pool "
                   "does not hold is skipped.")
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, callback=_methods,
              help="Decode methods; dense (our kernel) is always measured; sdpa: dense attention through "
                   "PyTorch SDPA over a contiguous copy of each sequence's blocks (SDPA reads no block table).")
@click.option("--budget", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Token budget of every method that takes one.")
@click.option("--roles", help="Head roles of lychee-type methods (e.g. learned:6, random:N, a roles file). "
                                "Default: random:24 on random-weight shapes (plus layer 0: 32 retrieval units of "
                                "Llama-3.1-8B's 256), the model's learned roles on real weights.")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=2),
              help="Timed decode steps per measurement (and N of the transformers baseline).")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=1),
              help="Untimed steps first; the first one captures the CUDA graph.")
@click.option("--hf-baseline/--no-hf-baseline", default=True, show_default=True,
              help="Also time transformers' generate (static cache, SDPA) on real-weight models, batch 1.")
@click.option("--hf-modes", default="eager,compiled", show_default=True, callback=_hf_modes,
              help="transformers baselines: eager, and/or compiled (its default on CUDA, torch.compile).")
@click.option("--hf-context", default="32k", show_default=True, callback=_context,
              help="Context of the transformers baseline (it prefills for real); must be one of --contexts.")
@click.option("--hf-random-shapes", is_flag=True,
              help="Run the transformers baseline on random-weight shapes too (a real prefill each).")
@click.option("--haystack", type=click.Path(exists=True, dir_okay=True),
              help="Prompt text of real-weight models: a text file or a folder of *.txt (default: the essays).")
@click.option("--compile/--no-compile", "compile_decode", default=True, show_default=True,
              help="Fuse the engine's element-wise decode work with torch.compile (--no-compile: measure it unfused).")
@click.option("--compile-mode", type=click.Choice(DECODE_COMPILE_MODES), default="default", show_default=True,
              help="torch.compile mode of that work: max-autotune-no-cudagraphs also times Triton GEMMs against cuBLAS.")
@click.option("--decode-linear", type=click.Choice(DECODE_LINEARS), default="auto", show_default=True,
              help="What runs the decode step's linear layers: torch (cuBLAS), gemv (the few-row Triton kernel) "
                   "or auto (gemv in compiled CUDA steps).")
@click.option("--profile", is_flag=True, help="Also list the device time of each kernel in one step of each "
              "method (PyTorch profiler over CUDA-graph replays; CUDA only).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0, max=2),
              help="Sampling temperature of the decoded sequences: 0 is greedy (the argmax); above 0 the step "
                   "samples (an API request without a temperature gets 1).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
              help="Top-p of the sampled sequences (with --temperature above 0).")
@click.option("--gpu-memory-utilization", default=0.9, show_default=True,
              type=click.FloatRange(min=0, max=1, min_open=True),
              help="Share of the GPU's memory the engine takes (weights, activations, KV pool).")
@click.option("--num-blocks", default=None, type=click.IntRange(min=2),
              help="KV pool blocks of 64 tokens, instead of sizing the pool from --gpu-memory-utilization.")
@click.option("--tensor-parallel-size", "-tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="GPUs each model is split over (from --device on); bytes, floor and ceiling are then per GPU.")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--out", default="out/bench-e2e", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.json, results.md and the PNG plots.")
def e2e(models: list[str], contexts: list[int], batches: list[int | str], methods: list[str], budget: int,
        roles: str | None, steps: int, warmup: int, hf_baseline: bool, hf_modes: tuple[str, ...], hf_context: int,
        hf_random_shapes: bool, haystack: str | None, compile_decode: bool, compile_mode: str, decode_linear: str,
        profile: bool, temperature: float, top_p: float, gpu_memory_utilization: float, num_blocks: int | None,
        tensor_parallel_size: int, device: str | None, out: Path) -> None:
    """Whole decode steps per method: ms/step with spread, GB/s, the bytes floor, x dense, ceiling, x transformers."""
    from .e2e import E2EOptions, results_markdown, run_e2e

    if top_p < 1 and not temperature:
        raise click.BadParameter("a greedy step (temperature 0) takes no top-p: pass --temperature above 0 with it",
                                 param_hint="--top-p")
    if hf_baseline and tensor_parallel_size == 1 and hf_context not in contexts:
        raise click.BadParameter(f"{hf_context} is not one of the contexts {contexts}: add it to --contexts "
                                 "or pass --no-hf-baseline", param_hint="--hf-context")
    opts = E2EOptions(
        models=models, contexts=contexts, batches=batches, methods=methods, budget=budget, roles=roles,
        steps=steps, warmup=warmup, hf_modes=hf_modes if hf_baseline else (), hf_context=hf_context,
        hf_random_shapes=hf_random_shapes, haystack=haystack, device=device, compile_decode=compile_decode,
        compile_mode=compile_mode, decode_linear=decode_linear, profile=profile,
        gpu_memory_utilization=gpu_memory_utilization, num_blocks=num_blocks,
        tensor_parallel_size=tensor_parallel_size, temperature=temperature, top_p=top_p,
    )
    results = run_e2e(opts, out)
    click.echo(results_markdown(results))
    click.echo(f"written to {out}/")


PROFILE_STEPS = 4  # decode steps under the profiler in `bench hf --profile`


@bench_group.command("hf")
@click.option("--models", default="qwen2.5-coder-1.5b", show_default=True, callback=_models,
              help="Comma-separated: random:<shape> (random weights), registry names, GGUF files or model folders.")
@click.option("--contexts", default="32k", show_default=True, callback=_contexts, help="Prompt lengths.")
@click.option("--methods", default="dense,lychee,lychee+lfps", show_default=True, callback=_methods,
              help="Methods run inside sparse_decoding.")
@click.option("--budget", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Token budget of every method that takes one.")
@click.option("--roles", help="Head roles of lychee-type methods (e.g. learned:6, random:N, a roles file). "
                                "Default: random:24 on random-weight shapes, the model's learned roles on real weights.")
@click.option("--steps", default=32, show_default=True, type=click.IntRange(min=2), help="Decode steps timed.")
@click.option("--compiled-baseline/--no-compiled-baseline", default=True, show_default=True,
              help="Also time plain generate compiled (transformers' default on CUDA).")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--profile", is_flag=True,
              help="Instead of the table, where each method's decode step spends its time: host and device ms, "
                   "launches, blocking CUDA calls, host reads, Triton compilations, top kernels and functions.")
@click.option("--out", default="out/bench-hf", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.json and results.md.")
def hf(models: list[str], contexts: list[int], methods: list[str], budget: int, roles: str | None, steps: int,
       compiled_baseline: bool, device: str | None, profile: bool, out: Path) -> None:
    """transformers generate inside sparsedecode.hf.sparse_decoding against plain generate (static cache,
    eager and compiled): ms per decode step and tokens/s, batch 1."""
    from .hf_bench import HFBenchOptions, results_markdown, run_hf_bench

    if "sdpa" in methods:
        raise click.BadParameter("sdpa is a benchmark-only method of bench e2e; give methods of sparsedecode.hf",
                                 param_hint="--methods")
    if profile and (len(models) > 1 or len(contexts) > 1):
        raise click.BadParameter("--profile takes one model and one context", param_hint="--models/--contexts")
    opts = HFBenchOptions(models=models, contexts=contexts, methods=methods, budget=budget, roles=roles,
                          steps=steps, compiled_baseline=compiled_baseline, device=device)
    try:
        if profile:
            from .hf_profile import run_hf_profile

            run_hf_profile(models[0], contexts[0], methods, budget, roles, steps, PROFILE_STEPS, out, device)
            return
        results = run_hf_bench(opts, out)
    except ValueError as e:  # a prompt over the model's positions, options the method refuses
        raise click.ClickException(str(e)) from None
    click.echo(results_markdown(results))
    click.echo(f"written to {out}/")


def _rates(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        rates = sorted({float(t) for t in _items(value)})
    except ValueError:
        rates = []
    if not rates or rates[0] <= 0:
        raise click.BadParameter(f"{value!r}: give positive request rates per second separated by commas, "
                                 "such as 1,2.5")
    return rates


@bench_group.command("serve")
@click.option("--model", "-m", default=None, help="Model of the servers it starts: random:<shape>, registry name, "
              "GGUF file or model folder (not with --url).")
@click.option("--url", default=None, help="Benchmark this running server (e.g. http://127.0.0.1:8000) instead of "
              "starting one per method; --methods and the method options are then unused.")
@click.option("--methods", default="dense,lychee", show_default=True, help="Comma-separated decode methods, "
              "one server each.")
@click.option("--budget", default="4096", show_default=True, help="Token budget of every method that takes one; "
              "a comma list runs each budget.")
@click.option("--method-option", "method_options", multiple=True, metavar="[METHOD:]KEY=VALUE",
              help="A decode-method option; repeat for more.")
@click.option("--variant", "variants", multiple=True, metavar="METHOD:KEY=VALUE[,KEY=VALUE]",
              help="One more server of METHOD with these options; repeat for more.")
@click.option("--concurrency", default="1,2,4,8", show_default=True, callback=_batches,
              help="Closed-loop clients; a comma list sweeps them.")
@click.option("--request-rate", "request_rates", default=None, callback=_rates,
              help="Open loop instead: Poisson arrivals at this many requests per second; a comma list sweeps.")
@click.option("--num-prompts", default=32, show_default=True, type=click.IntRange(min=1),
              help="Requests per point of the sweep.")
@click.option("--input-len", default="32k", show_default=True, callback=_context, help="Prompt tokens (4096, 32k).")
@click.option("--prefix-len", default="0", show_default=True, callback=_prefix,
              help="Leading prompt tokens the same in every request (one document, many questions; 126k): the "
              "prefix cache prefills them once, each request prefills the rest.")
@click.option("--output-len", default=256, show_default=True, type=click.IntRange(min=1), help="Output tokens.")
@click.option("--haystack", type=click.Path(exists=True), default=None,
              help="Prompt text: a text file or a folder of *.txt (default: the essays).")
@click.option("--serve-arg", "serve_args", multiple=True, metavar="ARG",
              help="A flag for the `sparsedecode serve` it starts, e.g. --serve-arg=--max-num-seqs=8; repeat.")
@click.option("--api-key", envvar="SPARSEDECODE_API_KEY", default=None,
              help="API key of the server at --url (also given to the servers it starts).")
@click.option("--slo-tpot-ms", default=50.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Report each method's highest output tokens/s with p99 time per output token under this.")
@click.option("--seed", default=0, show_default=True, help="Seed of the prompts and the arrivals.")
@click.option("--out", default="out/bench-serve", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.json, results.md, throughput.png and the servers' logs.")
def serve(model: str | None, url: str | None, methods: str, budget: str, method_options: tuple[str, ...],
          variants: tuple[str, ...], concurrency: list[int], request_rates: list[float] | None, num_prompts: int,
          input_len: int, prefix_len: int, output_len: int, haystack: str | None, serve_args: tuple[str, ...],
          api_key: str | None, slo_tpot_ms: float, seed: int, out: Path) -> None:
    """Serving load (closed-loop clients or Poisson arrivals): output tokens/s, requests/s, TTFT and TPOT
    p50 / p99 and the KV fraction read per method, a table and a plot of throughput against the load."""
    from ..evals.cli import method_runs
    from .serve import ServeBenchOptions, results_markdown, run_serve_bench

    if (model is None) == (url is None):
        raise click.UsageError("give --model (servers started here) or --url (a running server), not both")
    if prefix_len >= input_len:
        raise click.BadParameter(f"{prefix_len} tokens leave no tokens of the {input_len}-token prompt to differ; "
                                 "give a prefix shorter than --input-len", param_hint="--prefix-len")
    try:
        import openai  # noqa: F401  (the load generator's client)
    except ImportError:
        raise click.UsageError("the serving benchmark needs the openai client: "
                               "pip install 'sparsedecode[bench]'") from None
    try:
        budgets = sorted({parse_tokens(t) for t in _items(budget)})
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--budget") from None
    opts = ServeBenchOptions(
        runs=[] if url else method_runs(_items(methods), budgets, method_options, variants), model=model, url=url,
        api_key=api_key, concurrency=concurrency, request_rates=request_rates, num_prompts=num_prompts,
        input_len=input_len, prefix_len=prefix_len, output_len=output_len, haystack=haystack, serve_args=serve_args,
        slo_tpot_ms=slo_tpot_ms, seed=seed,
    )
    try:
        results = run_serve_bench(opts, out)
    except (RuntimeError, TimeoutError, ValueError) as e:  # a server that did not start, a sweep that cannot fit
        raise click.ClickException(str(e)) from None
    click.echo(results_markdown(results))
    click.echo(f"written to {out}/")


# -- LFPS and KV offload (bench/lfps_bench.py) ----------------------------------------------------------
def _echo_table(out: Path, name: str, rows: list | dict, columns: list[str] | None = None) -> None:
    from .lfps_bench import save_table

    click.echo(f"\n### {name}\n\n{save_table(out, name, rows, columns)}\n")


_LFPS_OUT = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/lfps"),
                         show_default=True, help="Folder for the JSON and markdown tables.")


@bench_group.command("lfps-recall")
@click.option("--model", default="qwen2.5-coder-1.5b", show_default=True, callback=_model)
@click.option("--contexts", default="8k,16k,32k", show_default=True, callback=_contexts)
@click.option("--steps", default=96, show_default=True, type=click.IntRange(min=1), help="Decode steps per context.")
@click.option("--budget", default=0.03, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Top-k tokens, or a fraction of the context if < 1.")
@click.option("--block-sizes", default="64,16", show_default=True, callback=_ints,
              help="LFPS block sizes (16, 32, 64 or 128).")
@click.option("--expands", default="0,1", show_default=True, callback=_ints)
@click.option("--haystack", type=click.Path(exists=True), default=None,
              help="Prompt text: a text file or a folder of *.txt (default: the essays).")
@_LFPS_OUT
@click.option("--tiny", is_flag=True, help="random:tiny-llama on the CPU, 1K context, 16 steps, budget 128.")
def lfps_recall(model: str, contexts: list[int], steps: int, budget: float, block_sizes: tuple[int, ...],
                expands: tuple[int, ...], haystack: str | None, out: Path, tiny: bool) -> None:
    """Recall of the exact top-k blocks and tokens by LFPS while a model decodes, per block size, refresh
    interval and expansion."""
    from .lfps_bench import METRICS, run_recall

    if not set(block_sizes) <= {16, 32, 64, 128}:
        raise click.BadParameter(f"{block_sizes}: block sizes are 16, 32, 64 or 128", param_hint="--block-sizes")
    device = None
    if tiny:
        model, contexts, steps, budget, device = "random:tiny-llama", [1024], 16, 128, "cpu"
    rows = run_recall(model, contexts, steps, budget, block_sizes, expands, device=device, haystack=haystack)
    _echo_table(out, "lfps_recall", rows, ["context", "budget", "block_size", "expand", "R", *METRICS])


@bench_group.command("lfps-index")
@click.option("--contexts", default="32k,64k,128k", show_default=True, callback=_contexts)
@click.option("--budget", default=4096, show_default=True, type=click.IntRange(min=64))
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1))
@_LFPS_OUT
@click.option("--tiny", is_flag=True, help="The CPU only, 8K context.")
def lfps_index(contexts: list[int], budget: int, repeats: int, out: Path, tiny: bool) -> None:
    """Index time of one Llama-3.1-8B layer: exact block scores over all keys against LFPS candidates, on the
    GPU and on one CPU core."""
    import torch

    from ..offload.scoring import torch_threads
    from .lfps_bench import run_index

    rows = []
    sizes = [8192] if tiny else contexts
    if torch.cuda.is_available() and not tiny:
        rows += run_index(sizes, "cuda", budget, repeats=repeats)
    with torch_threads(1):  # the paper's baseline: one CPU core
        rows += run_index(sizes, "cpu", 512 if tiny else budget, repeats=3 if tiny else max(3, repeats // 4))
    _echo_table(out, "lfps_index", rows,
                ["device", "context", "candidate_tokens", "candidate_fraction", "case", "ms", "ratio"])


def _offload_config(index_side: str, prefetch: bool = True, pool_blocks: int | None = None) -> OffloadConfig:
    from ..offload import OffloadConfig

    return OffloadConfig(index=index_side, prefetch=prefetch, pool_blocks=pool_blocks)


_POOL_BLOCKS = click.option("--pool-blocks", type=click.IntRange(min=2), default=None,
                            help="Staging slots per (layer, sequence, KV head), the newest block's included "
                                 "(default: as many as the method's candidate lists).")


@bench_group.command("offload")
@click.option("--model", default="random:llama-3.1-8b", show_default=True, callback=_model)
@click.option("--context", default="512k", show_default=True, callback=_context)
@click.option("--steps", default=32, show_default=True, type=click.IntRange(min=1),
              help="Timed decode steps after 2 untimed ones (refresh every 16: steps 16 and 32 are timed).")
@click.option("--fill", type=click.Choice(["random", "hot", "prefill"]), default="random", show_default=True,
              help="Random K/V stored into the pool (no structure: the worst case), random K/V with a stable "
                   "top-k (hot blocks), or a real prefill of a prompt.")
@click.option("--attend", type=click.Choice(["candidates", "selected"]), default="selected", show_default=True)
@click.option("--index", "index_side", type=click.Choice(["cpu", "gpu"]), default="gpu", show_default=True,
              help="Side of the index; with the GPU index the decode step is captured in a CUDA graph.")
@click.option("--prefetch/--no-prefetch", default=True, show_default=True,
              help="Copy the next layer's candidate blocks while this layer computes (with --attend candidates; "
                   "attend=selected never prefetches).")
@_POOL_BLOCKS
@click.option("--on-gpu/--no-on-gpu", default=False, show_default=True,
              help="Then the same decoding over an on-device pool (where the context fits the GPU).")
@_LFPS_OUT
@click.option("--tiny", is_flag=True, help="random:tiny-llama on the CPU, 2K context.")
def offload(model: str, context: int, steps: int, fill: str, attend: str, index_side: str, prefetch: bool,
            pool_blocks: int | None, on_gpu: bool, out: Path, tiny: bool) -> None:
    """KV offload: what each context needs on the GPU and the host, dense against offloaded, then lfps
    decoding from an offloaded pool: per kind of step its time, the bytes read from host memory, the hit
    rate, the link bandwidth achieved and the floor (weights at the measured device-memory bandwidth plus
    those bytes at the measured pinned-copy bandwidth); memory and bandwidths."""
    import os

    import torch

    from .lfps_bench import fit_table, run_offload

    shape = "tiny-llama" if tiny else "llama-3.1-8b"
    gpu = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else 80 * 2**30
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    contexts = [n << 10 for n in (128, 256, 384, 512, 640, 768, 1024)]
    _echo_table(out, "offload_fit", fit_table(shape, contexts, gpu, host))
    device = "cpu" if tiny else None
    model, context = ("random:tiny-llama", 2048) if tiny else (model, context)
    options = dict(attend=attend, budget=256 if tiny else 4096)
    rows, setup = run_offload(model, context, steps, device, options,
                              _offload_config(index_side, prefetch, pool_blocks), fill, on_gpu=on_gpu)
    _echo_table(out, "offload_run", rows, ["pool", "kind", "steps", "step_ms", "link_mb", "hit_rate", "link_gbps",
                                          "floor_ms", "over_floor"])
    _echo_table(out, "offload_setup", setup)


@bench_group.command("offload-hits")
@click.option("--model", default="qwen2.5-coder-1.5b", show_default=True, callback=_model)
@click.option("--contexts", default="16k,32k", show_default=True, callback=_contexts)
@click.option("--refresh", default="4,8,16,32", show_default=True, callback=_ints,
              help="Refresh intervals R (an exact step every R steps).")
@click.option("--steps", default=64, show_default=True, type=click.IntRange(min=1), help="Decode steps per run.")
@click.option("--budget", default=2048, show_default=True, type=click.IntRange(min=64))
@_POOL_BLOCKS
@click.option("--haystack", type=click.Path(exists=True), default=None,
              help="Filler text of the prompts: a text file or a folder of *.txt (default: the essays).")
@_LFPS_OUT
@click.option("--tiny", is_flag=True, help="smollm2-135m on the CPU, 2K context, 8 steps.")
def offload_hits(model: str, contexts: list[int], refresh: tuple[int, ...], steps: int, budget: int,
                 pool_blocks: int | None, haystack: str | None, out: Path, tiny: bool) -> None:
    """The staging pool's hit rate on real weights: lfps (attend=selected, GPU index) decoding after needle
    and RULER prompts, per refresh interval, beside random K/V (the worst case)."""
    from .lfps_bench import run_offload_hits

    device = None
    if tiny:
        model, contexts, steps, budget, device = "smollm2-135m", [2048], 8, 256, "cpu"
    options = dict(attend="selected", budget=budget)
    rows = run_offload_hits(model, contexts, refresh, steps, options, _offload_config("gpu", pool_blocks=pool_blocks),
                            device=device, haystack=haystack)
    _echo_table(out, "offload_hits", rows)


@bench_group.command("offload-serve")
@click.option("--model", default="random:llama-3.1-8b", show_default=True, callback=_model)
@click.option("--context", default="128k", show_default=True, callback=_context)
@click.option("--steps", default=32, show_default=True, type=click.IntRange(min=1),
              help="Timed decode steps after 3 untimed ones.")
@click.option("--sequences", type=click.IntRange(min=1), default=None,
              help="Sequences decoding offloaded (default: twice what dense holds).")
@click.option("--pool-blocks", type=click.IntRange(min=2), default=96, show_default=True,
              help="Staging slots per (layer, sequence, KV head), the newest block's included.")
@_LFPS_OUT
@click.option("--tiny", is_flag=True, help="random:tiny-llama on the CPU, 1K context, dense at most 4 sequences.")
def offload_serve(model: str, context: int, steps: int, sequences: int | None, pool_blocks: int, out: Path,
                  tiny: bool) -> None:
    """Sequences held and tokens/s: dense with the KV cache on the GPU (1, 2, 4, ... sequences, up to all
    its pool holds) against lfps with the values offloaded to host memory (twice as many sequences), random
    K/V and K/V with a stable top-k."""
    from .lfps_bench import run_offload_serving

    options, device, max_dense = dict(attend="selected", budget=4096), None, 64
    if tiny:
        model, context, options, device, max_dense = "random:tiny-llama", 1024, dict(attend="selected", budget=128), "cpu", 4
    rows = run_offload_serving(model, context, steps, options, pool_blocks, sequences, device=device,
                               max_dense=max_dense)
    _echo_table(out, "offload_serve", rows)


@bench_group.command("lfps-check")
@click.option("--model", default="random:llama-3.1-8b", show_default=True, callback=_model)
@click.option("--context", default="16k", show_default=True, callback=_context)
@click.option("--steps", default=24, show_default=True, type=click.IntRange(min=1))
@click.option("--attend", type=click.Choice(["candidates", "selected"]), default="selected", show_default=True)
@click.option("--index", "index_side", type=click.Choice(["cpu", "gpu", "none"]), default="cpu", show_default=True,
              help="Side of the offloaded cache's index; none: no offload check.")
@_LFPS_OUT
@click.option("--tiny", is_flag=True, help="random:tiny-llama on the CPU, 1K context.")
def lfps_check(model: str, context: int, steps: int, attend: str, index_side: str, out: Path, tiny: bool) -> None:
    """lfps with a budget covering the context against dense, CUDA-graph replay against eager, and
    offloaded decoding against on-device decoding: tokens (and attention outputs) equal."""
    from .lfps_bench import run_check

    device = "cpu" if tiny else None
    model, context = ("random:tiny-llama", 1024) if tiny else (model, context)
    options = dict(attend=attend, budget=128 if tiny else 2048, refresh_every=4)
    config = None if index_side == "none" else _offload_config(index_side)
    rows = run_check(model, context, steps, device, options, config)
    _echo_table(out, "lfps_check", rows, ["check", "passed", "same_tokens", "identical_outputs", "max_rel_err"])
    if not all(r["passed"] for r in rows):
        raise click.ClickException("a check failed (table above)")


# -- the engine check (bench/engine_check.py) --------------------------------------------------------------
@bench_group.command("engine-check")
@click.option("--timing/--no-timing", default=True, show_default=True,
              help="(a) decode-step timing of --model at --context, batches 1, 2, 4 and max.")
@click.option("--parity/--no-parity", default=True, show_default=True,
              help="(b) continuous batching against each request decoded alone.")
@click.option("--model", default="random:llama-3.1-8b", show_default=True, callback=_model,
              help="Model of the timing.")
@click.option("--context", default="128k", show_default=True, callback=_context, help="Context of the timing.")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=2), help="Timed steps per measurement.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--gpu-memory-utilization", default=0.9, show_default=True,
              type=click.FloatRange(min=0, max=1, min_open=True))
@click.option("--parity-model", default="random:tiny-llama", show_default=True,
              callback=_model,
              help="Model of the parity check; a registry model (e.g. smollm2-135m) gives real weights.")
@click.option("--parity-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True)
@click.option("--requests", default=16, show_default=True, type=click.IntRange(min=2))
@click.option("--min-len", default="4k", show_default=True, callback=_context, help="Shortest parity prompt.")
@click.option("--max-len", default="64k", show_default=True, callback=_context, help="Longest parity prompt.")
@click.option("--sparse-budget", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Token budget of the parity's sparse method (lychee+lfps): below the prompts' length, so "
                   "that it selects.")
@click.option("--tensor-parallel-size", "-tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="Above 1, the parity check serves the requests on that many GPUs against on one.")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--out", default="out/engine-check", show_default=True, type=click.Path(file_okay=False, path_type=Path))
def engine_check(timing: bool, parity: bool, model: str, context: int, steps: int, warmup: int,
                 gpu_memory_utilization: float, parity_model: str, parity_dtype: str, requests: int, min_len: int,
                 max_len: int, sparse_budget: int, tensor_parallel_size: int, device: str | None, out: Path) -> None:
    """The engine on one GPU in one process: decode-step timing at 128K and continuous-batching parity."""
    from .engine_check import ParityOptions, run_engine_check, timing_options

    if min_len > max_len:
        raise click.BadParameter(f"--min-len {min_len} is above --max-len {max_len}", param_hint="--min-len")
    timing_opts = timing_options(model, context, device, steps, warmup, gpu_memory_utilization) if timing else None
    try:
        parity_opts = ParityOptions(model=parity_model, dtype=parity_dtype, requests=requests, min_len=min_len,
                                    max_len=max_len, sparse_budget=sparse_budget, device=device,
                                    tensor_parallel_size=tensor_parallel_size) if parity else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--parity-model") from None
    if not run_engine_check(timing_opts, parity_opts, out, click.echo):
        changed = "continuous batching" if tensor_parallel_size == 1 else "tensor parallelism"
        raise click.ClickException(f"{changed} changed the tokens of a request (table above)")
    click.echo(f"written to {out}/")
