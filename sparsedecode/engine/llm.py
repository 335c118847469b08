"""The public entry point: `LLM(model, method=...)`, `generate` and `stream`, on the continuous-batching engine."""
from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..core import KVPool
from ..methods import make_method, method_class
from ..models import DECODE_COMPILE_MODES, DECODE_LINEARS
from ..models.loader import default_device, default_dtype, load_config, load_model
from ..models.parallel import TensorParallel, check_tensor_parallel
from ..offload import (OffloadConfig, OffloadedKVPool, check_offload_method, offload_config, offload_pool_blocks,
                       offload_staging_bytes)
from .llm_engine import LLMEngine, RequestOutput
from .model_runner import ModelRunner
from .sampling import TokenLogprob
from .sampling_params import SamplingParams
from .sequence import Sequence
from .tensor_parallel import TensorParallelRunner
from .workers import ShardSpec, Workers


SYNC_EVERY_GPU = 16  # decode steps per host synchronisation of `generate` on a GPU


def sampling_list(count: int, sampling_params: SamplingParams | list[SamplingParams] | None,
                  **keywords: Any) -> list[SamplingParams]:
    """One `SamplingParams` per prompt: `sampling_params` (one for all, or a list of `count`), or built from
    `LLM.generate`'s sampling keywords (`max_new_tokens` may be a list of `count` limits)."""
    if count == 0:
        raise ValueError("no prompts given")
    if sampling_params is not None:  # the keywords must then be left at their defaults
        defaults = inspect.signature(LLM.generate).parameters
        given = [name for name, value in keywords.items() if value != defaults[name].default]
        if given:
            raise ValueError(f"{', '.join(given)} given beside sampling_params: set them in the SamplingParams "
                             "(max_new_tokens is its max_tokens) or leave sampling_params out")
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        wanted = f"sampling_params must be one SamplingParams or a list of {count} (one per prompt)"
        if not isinstance(sampling_params, (list, tuple)):
            raise ValueError(f"{wanted}, not {type(sampling_params).__name__}")
        if len(sampling_params) != count:
            raise ValueError(f"{wanted}, not {len(sampling_params)} items")
        odd = [type(p).__name__ for p in sampling_params if not isinstance(p, SamplingParams)]
        if odd:
            raise ValueError(f"sampling_params holds {', '.join(odd)} where a SamplingParams goes")
        return list(sampling_params)
    limit = keywords.pop("max_new_tokens")
    limits = [limit] * count if isinstance(limit, int) else list(limit)
    if len(limits) != count:
        raise ValueError(f"max_new_tokens gives {len(limits)} limits for {count} prompts; give one, or one per prompt")
    if min(limits) < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {min(limits)}")
    return [SamplingParams(max_tokens=n, ignore_eos=keywords["stop_token_ids"] is not None, **keywords)
            for n in limits]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_seconds: float  # from the request's first scheduled prefill chunk to its first token
    decode_tokens_per_s: float  # this request's decoded tokens over the time from its first to its last token
    kv_bytes_per_token: float  # KV cache bytes read per decoded token, mean over this generation
    kv_fraction_read: float  # the same over what dense attention reads
    finish_reason: str  # "stop" or "length"
    prefill_reused: bool = False  # part of the prompt's KV came from the prefix cache
    cached_prompt_tokens: int = 0  # how many prompt tokens that was
    logprobs: list[TokenLogprob] | None = None  # per token of token_ids, with `generate(..., logprobs=k)`


class LLM:
    """A decoder over a paged KV pool with continuous batching (`llm.engine`), chunked prefill, prefix
    caching, CUDA-graph decode steps on GPU (their element-wise work fused by torch.compile unless
    `compile_decode=False`; `compile_mode="max-autotune-no-cudagraphs"` also lets Inductor tune their GEMMs;
    their linear layers run through the few-row Triton kernel `kernels.gemv`, or cuBLAS with
    `decode_linear="torch"`; `"gemv-fused"` also reads the RMSNorms, residual sums and SiLU-and-mul into
    those kernels; `llm.decode_linear` says which)
    and a pluggable decode-attention method (`dense`, `lychee`, `tidal`, `quest`,
    `streaming`, `lfps`, `lychee+lfps`).

    KV memory: on a GPU the pool takes `gpu_memory_utilization` of the GPU's memory less the weights and
    activations (the share is this process's own, as vLLM's: two at 0.45 share a GPU), never more than is
    free; `num_blocks` sets it. `max_context` is the longest prompt plus output (default: the
    model's), `max_num_seqs` the most sequences decoding together.

    KV offload: `kv_offload="cpu"` (or an `OffloadConfig`) keeps the pool in host memory and stages on the
    GPU the blocks a step reads (`sparsedecode.offload`; methods `lfps` and `lychee+lfps`). Sequences then
    prefill whole, one layer at a time, without prefix caching; decode steps are captured in CUDA graphs
    with the index on the GPU (`OffloadConfig(index="gpu")`), eager with the CPU index. On a GPU
    the pool holds every slot at `max_context`, or what the host's available memory (and, with the GPU
    index, `gpu_memory_utilization` of the GPU's free memory less the staging pools of `max_num_seqs` rows,
    for the keys) holds if less; `num_blocks` sets it.

    Tensor parallelism: `tensor_parallel_size=N` splits the model over N GPUs (from `device` on: cuda:0 ..
    cuda:N-1 by default; on a CPU, N processes), by KV head: N must divide the model's KV heads. The engine
    starts N - 1 worker processes itself; `close()` (or leaving a `with LLM(...)` block) stops them. A script
    that uses it needs the `if __name__ == "__main__":` guard (the workers are spawned).
    """

    def __init__(
        self,
        model: str | Path,
        method: str = "dense",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_context: int | None = None,
        block_size: int = 64,
        prefill_chunk: int = 2048,
        cuda_graphs: bool = True,
        compile_decode: bool = True,
        compile_mode: str = "default",
        decode_linear: str = "auto",
        kv_offload: str | OffloadConfig | None = None,
        max_num_seqs: int = 64,
        num_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        **method_options: Any,
    ) -> None:
        if block_size not in (16, 32, 64, 128):
            raise ValueError(f"block_size must be 16, 32, 64 or 128, not {block_size}")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.block_size = block_size
        method_options = self._method_options(method, method_options)  # checked before the weights load
        if kv_offload is not None:
            check_offload_method(method_class(method))
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        config = load_config(model)
        self.max_context = max_context or config.max_position_embeddings
        if compile_mode not in DECODE_COMPILE_MODES:
            raise ValueError(f"compile_mode {compile_mode!r} is not one of {', '.join(DECODE_COMPILE_MODES)}")
        fused = compile_decode and device.type == "cuda"
        self._compile_mode = compile_mode if fused else None
        if decode_linear not in DECODE_LINEARS:
            raise ValueError(f"decode_linear {decode_linear!r} is not one of {', '.join(DECODE_LINEARS)}")
        if decode_linear.startswith("gemv") and not fused:
            raise ValueError(f"decode_linear={decode_linear!r} runs in the compiled decode steps of a CUDA device: "
                             "it needs compile_decode=True and device cuda")
        if decode_linear == "auto":
            decode_linear = "gemv" if fused else "torch"
        self.decode_linear = decode_linear
        runner_options = dict(max_num_seqs=max_num_seqs, max_model_len=self.max_context, block_size=block_size,
                              max_num_batched_tokens=prefill_chunk, num_blocks=num_blocks,
                              gpu_memory_utilization=gpu_memory_utilization, cuda_graphs=cuda_graphs, fused=fused)
        self.workers, self._stop_workers = None, None
        if tensor_parallel_size != 1:
            if kv_offload is not None:
                raise ValueError("kv_offload keeps one GPU's KV cache in host memory; it does not combine with "
                                 "tensor_parallel_size > 1")
            check_tensor_parallel(config, tensor_parallel_size)
            self.workers = Workers(tensor_parallel_size, device, ShardSpec(
                str(model), dtype, self._compile_mode, method_class(method), method_options, runner_options,
                self.decode_linear))
            self._stop_workers = weakref.finalize(self, self.workers.close)
        try:
            self._start(model, method, device, dtype, kv_offload, method_options, runner_options,
                        enable_prefix_caching)
        except BaseException:
            self.close()
            raise

    def _start(self, model: str | Path, method: str, device: torch.device, dtype: torch.dtype,
               kv_offload: str | OffloadConfig | None, method_options: dict[str, Any],
               runner_options: dict[str, Any], enable_prefix_caching: bool) -> None:
        """Load the model (this process's slice of it) and build the engine over it."""
        loaded = load_model(model, device, dtype, self.workers.tp if self.workers else TensorParallel())
        if self.workers:
            self.workers.expect("loaded")  # a worker that could not load says so before any collective waits
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.model_spec = str(model)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        if self._compile_mode:
            self.model.compile_decode(self._compile_mode)
        self.model.decode_linear = self.decode_linear
        self.method = make_method(method, self.config, **method_options)
        self.method_name = method
        self.kv_offload = offload_config(kv_offload, self.device)
        pool_factory = KVPool
        if self.kv_offload is not None:
            # Prefills start at position 0 (layer-major), so no prompt starts from cached blocks.
            pool_factory = partial(OffloadedKVPool, config=self.kv_offload, compiled=runner_options["fused"])
            enable_prefix_caching = False
            if runner_options["num_blocks"] is None and self.device.type == "cuda":
                c, block_size, seqs = self.config, runner_options["block_size"], runner_options["max_num_seqs"]
                max_blocks = -(-self.max_context // block_size)
                block_bytes = KVPool.bytes_per_block(c.num_layers, c.num_kv_heads, block_size, c.head_dim, self.dtype)
                # the keys (GPU index) get what the staging pools of every decode row leave
                staging = offload_staging_bytes(self.kv_offload, self.method, seqs, max_blocks, c.num_layers,
                                                c.num_kv_heads, block_size, c.head_dim, self.dtype, self.device)
                num_blocks = offload_pool_blocks(self.kv_offload, seqs * max_blocks + 1, block_bytes, self.device,
                                                 runner_options["gpu_memory_utilization"], staging)
                runner_options = {**runner_options, "num_blocks": num_blocks}
        runner = ModelRunner(self.model, self.config, self.method, **runner_options, pool_factory=pool_factory)
        if self.workers:
            self.workers.expect("ready")
            runner = TensorParallelRunner(runner, self.workers)
        self.engine = LLMEngine(runner, self.tokenizer, self._eos_ids(), max_model_len=self.max_context,
                                max_num_seqs=runner_options["max_num_seqs"],
                                max_num_batched_tokens=runner_options["max_num_batched_tokens"],
                                enable_prefix_caching=enable_prefix_caching)

    def close(self) -> None:
        """Stop the worker processes of a model split over GPUs (nothing to do on one): the LLM serves no
        more requests. Also when the LLM is garbage-collected, at exit, and on leaving `with LLM(...) as llm:`."""
        if self._stop_workers is not None and self._stop_workers.alive:
            if hasattr(self, "engine"):  # rank 0's graphs captured the collectives: they go before the group
                self.engine.runner.local.drop_graphs()
            self._stop_workers()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- configuration -------------------------------------------------------------------------
    def _method_options(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        cls = method_class(name)
        if "block_size" in cls.defaults:
            options = {"block_size": self.block_size, **options}
        cls.check_options(options)
        return options

    def use_method(self, method: str, **options: Any) -> None:
        """Switch the decode method in place; the weights and the cached KV are kept, and running requests
        continue with the new method."""
        if self.kv_offload is not None:
            check_offload_method(method_class(method))
        self.method = make_method(method, self.config, **self._method_options(method, options))
        self.method_name = method
        self.engine.use_method(self.method)

    @property
    def cuda_graphs(self) -> bool:
        return self.engine.runner.cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, value: bool) -> None:
        self.engine.runner.set_cuda_graphs(value)

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.config.hf_config, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    # -- tokenisation --------------------------------------------------------------------------
    def apply_chat_template(self, messages: str | list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt string of a conversation through the model's chat template: `messages` as the OpenAI
        API gives them ({"role": ..., "content": ...} dicts), or one string for a single user turn; by
        default it ends by opening the assistant's turn."""
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            what = "no tokenizer (random weights)" if self.tokenizer is None else "no chat template"
            raise ValueError(f"this model has {what}: use a plain prompt instead of chat messages")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
            raise ValueError('messages must be a non-empty list of {"role": str, "content": ...} dicts, not '
                             f"{messages!r:.80}")
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]], **generate_options: Any
             ) -> list[Generation]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role", "content"} messages) or a list of
        conversations, each through the chat template (`apply_chat_template`), then `generate` with
        `generate_options` (max_new_tokens, sampling_params, ...); one Generation per conversation."""
        several = isinstance(messages, list) and bool(messages) and isinstance(messages[0], list)
        conversations = messages if several else [messages]
        return self.generate([self.apply_chat_template(c) for c in conversations], **generate_options)

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str] | list[list[int]] | str,
        max_new_tokens: int | list[int] = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        sync_every: int | None = None,
        logprobs: int | None = None,
        *,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[Generation]:
        """Generate for each prompt. A string prompt is used as given (apply the chat template with
        `apply_chat_template` first for chat models). Greedy when temperature is 0. `max_new_tokens`
        may be one limit per prompt. `stop_token_ids` replace the model's end-of-sequence tokens ([]: none).
        `sync_every`: decode steps between two looks at the tokens (stop checks; steps after a sequence's
        stop are wasted); default 16 on a GPU, where each look is a host synchronisation, and 1 on a CPU.
        `logprobs=k`: each token's log-probability and the k most likely tokens of its step
        (`Generation.logprobs`).

        `sampling_params`: instead of the sampling keywords above, vLLM's way: one `SamplingParams` for
        every prompt or one per prompt, with all its fields (top_k, penalties, logit_bias, ...)."""
        if sync_every is None:
            sync_every = SYNC_EVERY_GPU if self.device.type == "cuda" else 1
        if sync_every < 1:
            raise ValueError(f"sync_every must be at least 1 decode step, not {sync_every}")
        prompts = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else prompts
        params = sampling_list(len(prompts), sampling_params, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                               stop_token_ids=stop_token_ids, logprobs=logprobs)
        outputs = self._run(prompts, params, sync_every)
        for _ in outputs:
            pass
        return self._results

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        *,
        sampling_params: SamplingParams | None = None,
    ) -> Iterator[str]:
        """Yield the text of one prompt's generation piece by piece as tokens are decoded (`sampling_params`
        as in `generate`)."""
        params = sampling_list(1, sampling_params, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids)
        printed = 0
        for output in self._run([prompt], params, 1):
            yield output.text[printed:]
            printed = len(output.text)

    def _run(self, prompts: list, params: list[SamplingParams], sync_every: int) -> Iterator[RequestOutput]:
        engine = self.engine
        ids = [engine.encode(p) for p in prompts]
        for i, n in zip(ids, (p.max_tokens for p in params)):  # refuse the whole batch before queueing any of it
            if len(i) + n > self.max_context:
                raise ValueError(f"prompt of {len(i)} tokens plus max_new_tokens={n} exceeds max_context="
                                 f"{self.max_context}; shorten the prompt or raise max_context")
            engine.check_fits(len(i), n)
        request_ids = [engine.add_request(i, p) for i, p in zip(ids, params)]
        sequences = [engine.sequences[r] for r in request_ids]
        pending = set(request_ids)
        engine.decode_steps, previous_steps = sync_every, engine.decode_steps
        try:
            while pending:
                for output in engine.step():
                    if output.request_id in pending:
                        yield output
                        if output.finished:
                            pending.discard(output.request_id)
        finally:
            engine.decode_steps = previous_steps
            for r in pending:  # an abandoned stream frees its blocks
                engine.abort(r)
        self._results = [self._generation(seq) for seq in sequences]

    def _generation(self, seq: Sequence) -> Generation:
        decoded = max(len(seq.output_token_ids) - 1, 0)  # the first token comes from the prefill
        decode_seconds = seq.finish_time - seq.first_token_time
        row_bytes = 2 * self.config.head_dim * self.dtype.itemsize
        return Generation(
            text=self.engine.output(seq).text,
            token_ids=list(seq.output_token_ids),
            prompt_tokens=seq.num_prompt_tokens,
            prefill_seconds=seq.first_token_time - seq.first_scheduled_time,
            decode_tokens_per_s=decoded / decode_seconds if decoded and decode_seconds > 0 else 0.0,
            kv_bytes_per_token=seq.kv_rows * row_bytes / decoded if decoded else 0.0,
            kv_fraction_read=seq.kv_fraction_read,
            finish_reason=seq.finish_reason or "length",
            prefill_reused=seq.num_cached_tokens > 0,
            cached_prompt_tokens=seq.num_cached_tokens,
            logprobs=None if seq.logprobs is None else list(seq.logprobs),
        )
