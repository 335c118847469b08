"""The public entry point: `LLM(model, method=...)`, `generate` and `stream`."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..methods.base import DecodeMethod, make_method
from ..models.loader import load_model
from ..offload import OffloadConfig, OffloadedKVCache, check_offload_method, offload_config, prefill_layer_major
from .kv_cache import KVCache
from .sampling import sample_next

CAPACITY_MULTIPLE = 128  # the largest selection unit, so every unit size divides the cache length


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_tokens_per_s: float
    kv_bytes_per_token: float  # KV cache bytes read per decoded token, mean over this generation
    kv_fraction_read: float  # the same over what dense attention reads
    finish_reason: str  # "stop" or "length"
    prefill_reused: bool = False  # the same prompts' prefill was reused (prefill_seconds is then ~0)


class LLM:
    """A decoder with a static KV cache, chunked prefill, a CUDA-graph decode step on GPU (its element-wise
    work fused by torch.compile unless `compile_decode=False`), and a pluggable decode-attention method
    (`dense`, `lychee`, `tidal`, `quest`, `streaming`, `lfps`, ...)."""

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
        kv_offload: str | OffloadConfig | None = None,
        **method_options: Any,
    ) -> None:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        loaded = load_model(model, device, dtype)
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.max_context = max_context or self.config.max_position_embeddings
        if block_size not in (16, 32, 64, 128):
            raise ValueError(f"block_size must be 16, 32, 64 or 128, not {block_size}")
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        # "cpu": the KV cache in host memory, a block pool on the GPU (sparsedecode.offload); host-side work, no graphs
        self.kv_offload = offload_config(kv_offload, self.device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.kv_offload is None
        if compile_decode and self.device.type == "cuda":
            self.model.compile_decode()
        self.cache: KVCache | None = None
        self._prefilled: tuple | None = None  # (cache and prompts, last hidden states) of the last prefill
        self._graphs: dict[str, tuple] = {}  # variant -> (graph, logits, tokens, positions) static buffers
        self.use_method(method, **method_options)

    # -- configuration -------------------------------------------------------------------------
    def use_method(self, method: str, **options: Any) -> None:
        """Switch the decode method in place; the weights are shared."""
        if _accepts(method, "block_size"):
            options.setdefault("block_size", self.block_size)
        self.method: DecodeMethod = make_method(method, self.config, **options)
        self.method_name = method
        self._graphs.clear()
        self._planned_for: KVCache | None = None

    # -- tokenisation --------------------------------------------------------------------------
    def apply_chat_template(self, user_message: str) -> str:
        """The prompt string for one user turn, with the model's chat template."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )

    def _encode(self, prompts: list[str] | list[list[int]] | str) -> list[list[int]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not prompts:
            raise ValueError("no prompts given")
        encoded = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("this model has no tokenizer (random weights): pass token ids")
                ids = self.tokenizer(p, add_special_tokens=not _has_bos_text(self.tokenizer, p)).input_ids
            else:
                ids = [int(t) for t in p]
            if not ids or (isinstance(p, str) and not p):
                raise ValueError("empty prompt: give at least one token of text")
            encoded.append(ids)
        return encoded

    def _stop_ids(self, stop_token_ids: list[int] | None) -> set[int]:
        if stop_token_ids is not None:
            return set(stop_token_ids)
        eos = getattr(self.config.hf_config, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

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
        sync_every: int = 16,
    ) -> list[Generation]:
        """Generate for each prompt. A string prompt is used as given (apply the chat template with
        `apply_chat_template` first for chat models). Greedy when temperature is 0. `max_new_tokens`
        may be one limit per prompt: a batch of different tasks then decodes together, each sequence
        stopping at its own limit."""
        events = self._run(prompts, max_new_tokens, temperature, top_p, seed, stop, stop_token_ids, sync_every)
        for _ in events:
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
    ) -> Iterator[str]:
        """Yield the text of one prompt's generation piece by piece as tokens are decoded."""
        printed = 0
        for texts in self._run([prompt], max_new_tokens, temperature, top_p, seed, stop, stop_token_ids, 1):
            yield texts[0][printed:]
            printed = len(texts[0])

    def _run(self, prompts, max_new_tokens, temperature, top_p, seed, stop, stop_token_ids, sync_every) -> Iterator[list[str]]:
        token_lists = self._encode(prompts)
        batch = len(token_lists)
        limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != batch:
            raise ValueError(f"max_new_tokens gives {len(limits)} limits for {batch} prompts; "
                             "give one, or one per prompt")
        if min(limits) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {min(limits)}")
        longest = max(len(t) for t in token_lists)
        if any(len(t) + n > self.max_context for t, n in zip(token_lists, limits)):
            raise ValueError(
                f"prompt of up to {longest} tokens plus max_new_tokens={max(limits)} exceeds max_context="
                f"{self.max_context}; shorten the prompt or raise max_context"
            )
        max_new_tokens = max(limits)
        cache = self._cache_for(batch, KVCache.capacity_for(longest + max_new_tokens, CAPACITY_MULTIPLE))
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        stop_ids = self._stop_ids(stop_token_ids)

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        # The same prompts again (e.g. another method on an eval batch): decoding never writes below
        # the prompt lengths, so the cached prefill is still valid.
        key = (id(cache), tuple(map(tuple, token_lists)))
        reused = self._prefilled is not None and self._prefilled[0] == key
        if reused:
            last_hidden = self._prefilled[1]
        else:
            self._prefilled = None
            last_hidden = torch.stack([self._prefill(ids, b, cache) for b, ids in enumerate(token_lists)])
            self._prefilled = (key, last_hidden)
        for layer in range(self.config.num_layers):
            for b, ids in enumerate(token_lists):
                self.method.after_prefill(layer, cache, b, len(ids))
        tokens = sample_next(self.model.logits(last_hidden), temperature, top_p, generator)
        sync()
        prefill_seconds = time.perf_counter() - t0

        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=self.device)
        out[:, 0] = tokens
        positions = torch.tensor([len(t) for t in token_lists], dtype=torch.long, device=self.device)
        generated: list[list[int]] = [[] for _ in range(batch)]
        finished = [None] * batch  # finish reason once a sequence stops
        kv_rows: list[list[float]] = [[] for _ in range(batch)]  # per decode step, per sequence
        synced = 0
        t1 = time.perf_counter()
        steps = 0
        for step in range(max_new_tokens):
            if step > 0:
                variant = self.method.step_variant(step - 1)
                for b in range(batch):
                    kv_rows[b].append(self.method.kv_tokens_read(len(token_lists[b]) + step, variant))
                logits = self._decode(variant, tokens, positions, cache)
                tokens = sample_next(logits, temperature, top_p, generator)
                out[:, step] = tokens
                positions += 1
                steps += 1
            if (step + 1) % sync_every == 0 or step == max_new_tokens - 1:
                new = out[:, synced : step + 1].tolist()
                synced = step + 1
                texts = self._absorb(new, generated, finished, stop_ids, stop, limits)
                yield texts
                if all(finished):
                    break
        sync()
        decode_seconds = time.perf_counter() - t1
        self._results = self._finish(token_lists, generated, finished, kv_rows, prefill_seconds, decode_seconds, steps, stop, reused)

    def _absorb(self, new, generated, finished, stop_ids, stop, limits) -> list[str]:
        """Append newly synced tokens, ending sequences at a stop token or stop string, or at their limit."""
        for b, toks in enumerate(new):
            for t in toks:
                if finished[b]:
                    break
                generated[b].append(t)
                if t in stop_ids:
                    finished[b] = "stop"
                elif len(generated[b]) == limits[b]:
                    finished[b] = "length"
            if stop and not finished[b] and self.tokenizer is not None:
                text = self.tokenizer.decode(generated[b], skip_special_tokens=True)
                if any(s in text for s in stop):
                    finished[b] = "stop"
        return [self._text(g, stop) for g in generated]

    def _text(self, ids: list[int], stop: list[str] | None) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in stop or []:
            if s in text:
                text = text[: text.index(s)]
        return text

    def _finish(self, token_lists, generated, finished, kv_rows, prefill_seconds, decode_seconds, steps, stop, reused):
        row_bytes = 2 * self.config.head_dim * self.dtype.itemsize
        decoded_counts = [max(len(g) - 1, 0) for g in generated]  # the first token comes from the prefill
        extra_rows = self.method.extra_kv_tokens_read([len(ids) + (n + 1) / 2 for ids, n in zip(token_lists, decoded_counts)])
        results = []
        for b, ids in enumerate(token_lists):
            decoded = decoded_counts[b]
            dense_rows = sum(self.config.num_layers * self.config.num_kv_heads * (len(ids) + s) for s in range(1, decoded + 1))
            # analytic rows of the steps before the sequence stopped, plus the rows only the device counted
            rows = sum(kv_rows[b][:decoded]) + extra_rows[b]
            results.append(
                Generation(
                    text=self._text(generated[b], stop),
                    token_ids=generated[b],
                    prompt_tokens=len(ids),
                    prefill_seconds=prefill_seconds,
                    decode_tokens_per_s=steps / decode_seconds if decode_seconds > 0 and steps else 0.0,
                    kv_bytes_per_token=rows * row_bytes / decoded if decoded else 0.0,
                    kv_fraction_read=rows / dense_rows if dense_rows else 0.0,
                    finish_reason=finished[b] or "length",
                    prefill_reused=reused,
                )
            )
        return results

    # -- the model runner ----------------------------------------------------------------------
    def _cache_for(self, batch: int, capacity: int) -> KVCache:
        if self.kv_offload is not None:
            check_offload_method(self.method)
        c = self.cache
        if c is None or c.batch_size != batch or c.capacity != capacity:
            self.cache = None
            self._prefilled = None
            self._graphs.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            shape = (self.config.num_layers, batch, self.config.num_kv_heads, capacity, self.config.head_dim,
                     self.block_size, self.dtype, self.device)
            self.cache = OffloadedKVCache(*shape, self.kv_offload) if self.kv_offload else KVCache(*shape)
        if self._planned_for is not self.cache:
            self.method.plan(self.cache)
            self._planned_for = self.cache
            self._graphs.clear()
        return self.cache

    def _prefill(self, ids: list[int], batch_index: int, cache: KVCache) -> torch.Tensor:
        token_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        if isinstance(cache, OffloadedKVCache):  # the whole KV of the prompt never sits on the device
            return prefill_layer_major(self.model, token_ids, cache, batch_index, self.prefill_chunk)
        for start in range(0, len(ids), self.prefill_chunk):
            hidden = self.model.prefill_chunk(token_ids[start : start + self.prefill_chunk], start, cache, batch_index)
        return hidden

    def _decode(self, variant: str, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        self.method.set_variant(variant)
        if not self.cuda_graphs:
            return self.model.decode_step(tokens, positions, cache, self.method)
        if variant not in self._graphs:
            # The first step of a variant runs eagerly (it compiles kernels and is a real step);
            # capturing afterwards only records, so stateful methods see each step once.
            logits = self.model.decode_step(tokens, positions, cache, self.method)
            static_tokens, static_positions = tokens.clone(), positions.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_logits = self.model.decode_step(static_tokens, static_positions, cache, self.method)
            self._graphs[variant] = (graph, static_logits, static_tokens, static_positions)
            return logits
        graph, static_logits, static_tokens, static_positions = self._graphs[variant]
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        graph.replay()
        return static_logits


def _accepts(method: str, option: str) -> bool:
    from ..methods.base import METHODS
    from ..methods import available  # noqa: F401

    cls = METHODS.get(method)
    return cls is not None and option in cls.defaults


def _has_bos_text(tokenizer: Any, text: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)
