"""`sparsedecode serve`: the flags are named as vLLM's `vllm serve` names them."""
from __future__ import annotations

import click

from ..cli import KV_OFFLOAD_CHOICES, offload_option, parse_method_options


@click.command("serve")
@click.option("--model", "-m", required=True, help="Registry name, GGUF file, HF folder or random:<shape>.")
@click.option("--method", default="dense", show_default=True,
              help="dense, lychee, tidal, quest, streaming, lfps, lychee+lfps")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="Decode-method option (e.g. budget=4096); repeat for more.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--served-model-name", "served_model_names", multiple=True,
              help="Name(s) clients pass as `model` (default: --model); repeat for more; the first is reported.")
@click.option("--api-key", envvar="SPARSEDECODE_API_KEY", default=None,
              help="Require 'Authorization: Bearer <key>' on /v1/* (env SPARSEDECODE_API_KEY).")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
              help="Requests decoded together at most (default: the engine's).")
@click.option("--max-model-len", type=click.IntRange(min=1), default=None,
              help="Prompt plus output tokens of one request at most (default: the model's context).")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Fraction of GPU memory the weights and KV-cache pool may take (default: the engine's).")
@click.option("--num-gpu-blocks-override", type=click.IntRange(min=1), default=None,
              help="KV-cache blocks in the pool, instead of sizing it from --gpu-memory-utilization.")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="Tokens per KV-cache block (default: the engine's).")
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=None,
              help="Prompt tokens prefilled per engine step at most (chunked prefill; default: the engine's): "
                   "larger chunks prefill faster, smaller ones keep running streams' time per token lower.")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True,
              help="Reuse the KV blocks of an earlier prompt's identical leading blocks.")
@click.option("--num-scheduler-steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="Decode steps per engine step (one host synchronisation each; a stream then gets up to that "
                   "many tokens at once, and steps after a request's stop are wasted).")
@click.option("--tensor-parallel-size", "-tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="GPUs the model is split over (by KV head: it must divide the model's KV heads).")
@click.option("--kv-offload", type=click.Choice(KV_OFFLOAD_CHOICES), default=None,
              help="KV cache in host memory, so the pool holds more sequences than GPU memory (methods lfps, "
                   "lychee+lfps): the index scores on the CPU over host keys, or on the GPU, where the keys stay.")
@click.option("--offload-threads", type=click.IntRange(min=1), default=None,
              help="Threads of the CPU index (default: PyTorch's).")
@click.option("--enforce-eager", is_flag=True,
              help="Run decode steps eagerly: no CUDA graphs, so no compile and capture at start.")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Compute dtype (default: the loader's choice).")
@click.option("--uvicorn-log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug", "trace"]))
def serve_command(model: str, method: str, options: tuple[str, ...], host: str, port: int,
                  served_model_names: tuple[str, ...], api_key: str | None, max_num_seqs: int | None,
                  max_model_len: int | None, gpu_memory_utilization: float | None,
                  num_gpu_blocks_override: int | None, block_size: str | None,
                  max_num_batched_tokens: int | None, enable_prefix_caching: bool, num_scheduler_steps: int,
                  tensor_parallel_size: int,
                  kv_offload: str | None, offload_threads: int | None, enforce_eager: bool, device: str | None,
                  dtype: str | None, uvicorn_log_level: str) -> None:
    """An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    import uvicorn

    from .. import LLM
    from .app import build_app

    offload = offload_option(kv_offload, offload_threads)
    engine_args = {"max_num_seqs": max_num_seqs, "max_context": max_model_len, "kv_offload": offload,
                   "gpu_memory_utilization": gpu_memory_utilization, "num_blocks": num_gpu_blocks_override,
                   "block_size": int(block_size) if block_size else None, "dtype": dtype,
                   "prefill_chunk": max_num_batched_tokens, "enable_prefix_caching": enable_prefix_caching}
    try:
        llm = LLM(model, method=method, device=device, tensor_parallel_size=tensor_parallel_size,
                  cuda_graphs=not enforce_eager,
                  **{k: v for k, v in engine_args.items() if v is not None}, **parse_method_options(options))
    except (ValueError, TypeError, FileNotFoundError) as e:  # unknown model or method, bad option, pool too big
        raise click.UsageError(str(e)) from None
    llm.engine.decode_steps = num_scheduler_steps
    # A bucket's first step compiles and captures for seconds: pay that now, not in the first requests' latency.
    captured = llm.engine.capture_decode_steps()
    if captured:
        click.echo(f"decode steps captured for batch sizes {', '.join(str(b) for b, _ in captured)} in "
                   f"{sum(s for _, s in captured):.1f} s", err=True)
    app = build_app(llm, list(served_model_names) or [model], api_key)
    uvicorn.run(app, host=host, port=port, log_level=uvicorn_log_level, timeout_graceful_shutdown=5)
