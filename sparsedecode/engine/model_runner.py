"""Runs the model over the paged KV pool: prefill chunks, and decode steps captured as CUDA graphs.

The runner owns the model, the pool and the decode method. A decode step covers the first `bucket`
decode slots (1, 2, 4, 8, ... up to `max_num_seqs`): rows whose slot holds no decoding sequence point at
the null block and are discarded. Each (bucket, token choice) step is captured once as a CUDA
graph over fixed buffers: tokens, positions, per-sequence step counters, block tables and sampling
parameters. A graph replay feeds its sampled tokens back as the next input, so `decode` runs several
steps with one host synchronisation at the end.

Prefill chunks of several sequences go through the weights as one batch of tokens; each chunk stores
its K/V in the pool and attends causally to its sequence's prefix (read in place from the pool when
the chunk does not start the sequence: `KVPool.prefill_attention`). A pool that keeps its K/V in host
memory (`KVPool.layer_major_prefill`) takes each sequence's prefill whole, one layer at a time
(`prefill_layer_major`); its decode steps are captured unless the pool says otherwise
(`KVPool.decode_graphs`).

On one GPU of a tensor-parallel model (`model.tp`) the runner holds that GPU's KV heads (`kv_heads`): its
pool, and the method's state, are theirs; the logits, and so the sampled tokens, are the whole model's.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..core import DecodeBatch, KVPool, check_gpu_memory_utilization, kv_pool_budget_bytes
from ..methods.base import DecodeMethod
from ..models.config import ModelConfig
from ..models.transformer import Transformer, prefill_attention
from .block_tables import BlockTables, TableChange
from .sampling import (MAX_LOGPROBS, Penalties, PenaltyRow, TokenLogprob, sample_tokens, sample_unfiltered,
                       token_logprobs)

CPU_KV_BYTES = 2**30  # default pool size on a CPU device (a GPU's is sized from its free memory)
GPU_MARGIN_BYTES = 2**30  # left free on a GPU for graphs, kernel scratch and the allocator's slack


@dataclass
class DecodeRow:
    """One decoding sequence of a `decode` call."""

    slot: int
    token: int  # the last sampled token: this step's input
    position: int  # its position (tokens before it)
    step: int  # decode steps since the slot was reset
    block_table: list[int]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    logprobs: int | None = None  # report its tokens' `TokenLogprob`s with this many top tokens (None: none)
    penalties: PenaltyRow | None = None  # its penalties, logit bias, min_p or min_tokens (None: none)


@dataclass
class PrefillRequest:
    """Tokens [start, start + len(token_ids)) of one sequence whose blocks are `block_table`."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    wants_logits: bool  # the chunk ends the sequence's prefill: return its last token's logits
    slot: int | None = None  # the sequence's decode slot: the method may observe its last prompt queries


#: the `DecodeRow` fields a step reads, grouped by the dtype of their device buffers, with an idle row's values
STEP_INPUTS = ((torch.int64, {"token": 0, "position": 0, "top_k": 0, "seed": 0}),
               (torch.int32, {"step": 0}),  # `DecodeBatch.steps`
               (torch.float32, {"temperature": 0.0, "top_p": 1.0}))


#: how a step picks its tokens: every row greedy; sampled rows none of which filters (no top-k, top-p, min-p
#: or penalties); sampled with filters. A step variant each.
TOKEN_CHOICES = ("greedy", "sampled", "filtered")


def token_choice(rows: list[DecodeRow]) -> str:
    """The `TOKEN_CHOICES` entry that serves every row."""
    sampled = [r for r in rows if r.temperature > 0]
    if not sampled:
        return "greedy"
    if any(r.top_k > 0 or r.top_p < 1 or r.penalties is not None for r in sampled):
        return "filtered"
    return "sampled"


def graph_buckets(max_num_seqs: int) -> list[int]:
    buckets, b = [], 1
    while b < max_num_seqs:
        buckets.append(b)
        b *= 2
    return buckets + [max_num_seqs]


class ModelRunner:
    def __init__(self, model: Transformer, config: ModelConfig, method: DecodeMethod, *, max_num_seqs: int,
                 max_model_len: int, block_size: int, max_num_batched_tokens: int, num_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, cuda_graphs: bool = True, fused: bool = False,
                 pool_factory: Callable[..., KVPool] = KVPool) -> None:
        self.model, self.config = model, config
        self.kv_heads = model.tp.part(config.num_kv_heads)  # the model's KV heads this runner holds
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_blocks = -(-max_model_len // block_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.fused = fused
        self.buckets = graph_buckets(max_num_seqs)
        seqs, device = max_num_seqs, self.device
        # The rows' step inputs: rows of one device tensor per dtype, each loaded by one asynchronous copy from
        # pinned host memory (`_load`) instead of a copy and a few host-side tensor operations per input.
        pinned = device.type == "cuda"
        self.inputs_copied = torch.cuda.Event() if pinned else None  # once done, the host arrays may change
        self.step_inputs = []  # (fields and idle values, pinned host rows, device rows) per dtype
        for dtype, fields in STEP_INPUTS:
            idle = torch.tensor(list(fields.values()), dtype=dtype)[:, None].repeat(1, seqs)
            self.step_inputs.append((fields, idle.pin_memory() if pinned else idle, idle.to(device)))
        (self.tokens, self.positions, self.top_k, self.seeds), (self.steps,), (self.temperature, self.top_p) = (
            inputs for _, _, inputs in self.step_inputs)
        self.seq_lens = torch.zeros(seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(seqs, self.max_blocks, dtype=torch.int32, device=device)
        self.tables = BlockTables(seqs, self.max_blocks)  # their host copy, updated by what changed
        self.rope_table = model.rope.table(max_model_len, self.dtype)  # decode steps gather their cos / sin
        self.num_top = min(MAX_LOGPROBS, config.vocab_size)
        self.chosen_logprobs = torch.zeros(seqs, dtype=torch.float32, device=device)
        self.top_logprobs = torch.zeros(seqs, self.num_top, dtype=torch.float32, device=device)
        self.top_ids = torch.zeros(seqs, self.num_top, dtype=torch.int64, device=device)
        self.penalties: Penalties | None = None  # per-slot state of penalized rows, made at the first of them
        # (bucket, token choice, logprobs, penalized)
        self.graphs: dict[tuple[int, str, bool, bool], torch.cuda.CUDAGraph] = {}
        self.prompt_queries: dict[int, list[torch.Tensor]] = {}  # slot -> per layer, the last prefill queries
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.method = method
        method.use_kv_heads(self.kv_heads)
        if num_blocks is None:
            # every GPU of a tensor-parallel model holds the same blocks: as many as the fullest one has room for
            num_blocks = model.tp.min(self.pool_blocks_for_memory(method, gpu_memory_utilization))
        # `pool_factory` takes KVPool's arguments: another pool keeps the K/V elsewhere (sparsedecode.offload)
        self.pool = pool_factory(config.num_layers, num_blocks, len(self.kv_heads), block_size, config.head_dim,
                                 self.dtype, device)
        if not self.pool.decode_graphs:  # its steps sync with the host: eager
            self.cuda_graphs = False
        self.use_method(method)

    # -- set-up ---------------------------------------------------------------------------------
    def block_bytes(self, method: DecodeMethod) -> int:
        c = self.config
        kv = KVPool.bytes_per_block(c.num_layers, len(self.kv_heads), self.block_size, c.head_dim, self.dtype)
        return kv + method.block_state_bytes(self.block_size, self.dtype)

    @torch.inference_mode()
    def pool_blocks_for_memory(self, method: DecodeMethod, utilization: float) -> int:
        """Blocks that fit: on a GPU, `utilization` of its memory (this process's share, never more than is
        free) less the weights, a prefill's peak activations, the method's per-slot state and a margin; on a
        CPU, `CPU_KV_BYTES`, or what every slot at full length needs if less."""
        check_gpu_memory_utilization(utilization)
        per_block = self.block_bytes(method)
        wanted = self.max_num_seqs * self.max_blocks + 1
        if self.device.type != "cuda":
            return max(2, min(wanted, CPU_KV_BYTES // per_block))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        probe = KVPool(self.config.num_layers, 2, len(self.kv_heads), self.block_size, self.config.head_dim,
                       self.dtype, self.device)
        method.plan(probe, self.max_num_seqs, self.max_blocks)  # per-slot state, measured
        tokens = torch.zeros(self.max_num_batched_tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(self.max_num_batched_tokens, device=self.device)

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return prefill_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)

        self.model.logits(self.model.forward(tokens, positions, attention)[-1:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del probe, tokens, positions
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = kv_pool_budget_bytes(total, free + cached, before, peak + GPU_MARGIN_BYTES, utilization)
        blocks = int(budget // per_block)
        if blocks < 2:
            raise RuntimeError(
                f"no GPU memory left for the KV pool at gpu_memory_utilization={utilization} "
                f"({budget / 2**30:.1f} GiB after the weights and activations): raise it, lower max_model_len "
                "or max_num_seqs, or give num_blocks")
        return min(blocks, wanted)

    @torch.inference_mode()
    def use_method(self, method: DecodeMethod) -> None:
        """Decode with `method` from now on (the pool's K/V are kept)."""
        self.method = method
        method.use_kv_heads(self.kv_heads)
        self.drop_graphs()
        method.plan(self.pool, self.max_num_seqs, self.max_blocks)

    def set_cuda_graphs(self, value: bool) -> None:
        """Capture decode steps as CUDA graphs (on a GPU, over a pool that allows it) or run them eagerly."""
        self.cuda_graphs = value and self.device.type == "cuda" and self.pool.decode_graphs
        self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forget the captured steps (a new method, or graphs turned off). Their memory pool goes with them:
        the allocator refuses to capture into a pool all of whose graphs were freed."""
        self.graphs.clear()
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    def bucket_for(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def batch(self, size: int) -> DecodeBatch:
        return DecodeBatch(self.block_tables[:size], self.seq_lens[:size], self.steps[:size])

    # -- prefill --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, requests: list[PrefillRequest]) -> torch.Tensor:
        """Compute and store the K/V of every request's tokens; returns float32 logits [n, vocab] of the last
        token of each request that `wants_logits`, in order."""
        if self.pool.layer_major_prefill:  # K/V off the device: each sequence whole, one layer at a time
            if any(r.start for r in requests):
                raise RuntimeError("a pool that prefills layer-major takes each sequence's prefill whole, from "
                                   "position 0 (Scheduler(whole_prefills=True)), not in chunks")
            rows = [self.prefill_layer_major(r.token_ids, r.block_table, r.slot) for r in requests]
            wanted = [row for r, row in zip(requests, rows) if r.wants_logits]
            return torch.cat(wanted) if wanted else rows[0][:0]
        bs, device = self.block_size, self.device
        ids = [t for r in requests for t in r.token_ids]
        positions = np.concatenate([np.arange(r.start, r.start + len(r.token_ids)) for r in requests])
        tables = [np.asarray(r.block_table, dtype=np.int64) for r in requests]
        blocks = np.concatenate([t[np.arange(r.start, r.start + len(r.token_ids)) // bs] for r, t in zip(requests, tables)])
        spans = np.cumsum([0] + [len(r.token_ids) for r in requests])
        block_ids = torch.from_numpy(blocks).to(device)
        offsets = torch.from_numpy(positions % bs).to(device)
        device_tables = [torch.from_numpy(t).to(device) for t in tables]

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.pool.store(layer, block_ids, offsets, k, v)
            outs = []
            for r, table, lo, hi in zip(requests, device_tables, spans[:-1], spans[1:]):
                self.keep_queries(r.slot, layer, q[lo:hi], r.start == 0)
                if r.start == 0:  # the chunk is the whole prefix
                    outs.append(prefill_attention(q[lo:hi].transpose(0, 1), k[lo:hi].transpose(0, 1),
                                                  v[lo:hi].transpose(0, 1)).transpose(0, 1))
                else:  # behind a prefix: its keys read in place from the pool
                    outs.append(self.pool.prefill_attention(layer, q[lo:hi], table, r.start + len(r.token_ids)))
            return torch.cat(outs)

        x = self.model.forward(torch.tensor(ids, device=device), torch.from_numpy(positions).to(device), attention)
        last = [int(hi) - 1 for r, hi in zip(requests, spans[1:]) if r.wants_logits]
        return self.model.logits(x[last])

    @torch.inference_mode()
    def prefill_layer_major(self, token_ids: list[int], block_table: list[int], slot: int | None = None
                            ) -> torch.Tensor:
        """Prefill one sequence from position 0 layer by layer: every token through layer 0 (in chunks of
        `max_num_batched_tokens`, each attending causally to the layer's keys so far), the layer's K/V
        stored in one call, then layer 1, and so on. The device holds the tokens' hidden states and one
        layer's K/V, never every layer's prefix, and a pool in host memory receives each layer once. Each
        chunk meets the keys and runs the operations it runs in `prefill`. Returns the float32 logits
        [1, vocab] of the last token."""
        n, bs, device, dtype, c = len(token_ids), self.block_size, self.device, self.dtype, self.config
        positions = torch.arange(n, device=device)
        table = torch.tensor(block_table, dtype=torch.int64, device=device)
        block_ids, offsets = table[positions // bs], positions % bs
        k_all = torch.empty(n, len(self.kv_heads), c.head_dim, dtype=dtype, device=device)
        v_all = torch.empty_like(k_all)
        x = self.model.embed_tokens(torch.tensor(token_ids, device=device))
        for layer in range(c.num_layers):
            for start in range(0, n, self.max_num_batched_tokens):
                end = min(start + self.max_num_batched_tokens, n)
                cos, sin = self.model.rope(positions[start:end], dtype)

                def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = start,
                              end: int = end) -> torch.Tensor:
                    self.keep_queries(slot, layer, q, start == 0)
                    k_all[start:end], v_all[start:end] = k, v
                    keys, values = (k, v) if start == 0 else (k_all[:end], v_all[:end])
                    return prefill_attention(q.transpose(0, 1), keys.transpose(0, 1),
                                             values.transpose(0, 1)).transpose(0, 1)

                x[start:end] = self.model.layer_forward(layer, x[start:end], cos, sin, attention)
            self.pool.store(layer, block_ids, offsets, k_all, v_all)
        return self.model.logits(x[-1:])

    def keep_queries(self, slot: int | None, layer: int, q: torch.Tensor, first_chunk: bool) -> None:
        """Keep the last `method.prompt_queries` queries of a sequence's prefill so far (across its chunks)."""
        wanted = self.method.prompt_queries
        if not wanted or slot is None:
            return
        kept = self.prompt_queries.setdefault(slot, [])  # layers arrive in order, chunk after chunk
        if len(kept) <= layer:
            kept.append(q[-wanted:].clone())
        else:  # a first chunk replaces what a preempted earlier prefill of the slot left
            kept[layer] = (q if first_chunk else torch.cat([kept[layer], q]))[-wanted:].clone()

    @torch.inference_mode()
    def start_decoding(self, slot: int, block_table: list[int], length: int) -> None:
        """A sequence whose first `length` tokens are in the pool takes decode slot `slot`."""
        self.method.reset_slot(slot)
        self.tables.reset(slot)
        blocks = torch.tensor(block_table, dtype=torch.int64, device=self.device)
        queries = self.prompt_queries.pop(slot, None)
        for layer in range(self.config.num_layers):
            if queries is None:
                self.method.after_prefill(layer, self.pool, blocks, length)
            else:
                self.method.after_prefill(layer, self.pool, blocks, length, queries=queries[layer])

    def extra_kv_tokens_read(self, slot: int, mean_seq_len: float) -> float:
        """The method's `extra_kv_tokens_read` of `slot`, for the KV heads this runner holds."""
        return self.method.extra_kv_tokens_read(slot, mean_seq_len)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: list[DecodeRow]
               ) -> tuple[list[int], list[TokenLogprob | None] | None]:
        """Tokens for logits [n, vocab] with each row's sampling parameters (its `position`: the token's), and,
        when a row asks for them, per row its token's `TokenLogprob` (None for the others)."""
        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(r, name) for r in rows], dtype=dtype, device=self.device)

        scored, min_p = logits, None
        if any(r.penalties is not None for r in rows):
            penalties = Penalties(len(rows), logits.shape[-1], self.device)
            penalties.load([(i, r.penalties) for i, r in enumerate(rows)], len(rows))
            scored, min_p = penalties.apply(logits), penalties.min_p
        tokens = sample_tokens(scored, column("temperature", torch.float32), column("top_p", torch.float32),
                               column("top_k", torch.int64), column("seed", torch.int64),
                               column("position", torch.int64), min_p)
        host = tokens.tolist()
        if all(r.logprobs is None for r in rows):
            return host, None
        chosen, values, ids = token_logprobs(logits, tokens, self.num_top)
        per_row = with_logprobs(rows, [[t] for t in host], chosen[None], values[None], ids[None], range(len(rows)))
        return host, [lists[0] if lists else None for lists in per_row]

    # -- decode ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, rows: list[DecodeRow], num_steps: int,
               table_changes: list[TableChange] | None = None
               ) -> tuple[list[list[int]], list[list[TokenLogprob] | None] | None]:
        """Run `num_steps` decode steps for `rows`; returns per row its `num_steps` sampled tokens (one host
        synchronisation) and, when a row asks for them, per row their `TokenLogprob`s (None for the others).
        A row's block table is a list the caller only extends in place between calls for its slot, or
        replaces by a new list (`BlockTables`). `table_changes`: the rows' table changes as rank 0 computed
        them (a tensor-parallel worker's rows then carry no tables)."""
        size = self.bucket_for(max(r.slot for r in rows) + 1)
        if self.pool.reserve_rows(size):  # the pool's per-row buffers moved: steps captured before are stale
            self.drop_graphs()
        if table_changes is None:
            table_changes = self.tables.changes([(r.slot, r.block_table) for r in rows])
        penalized = any(r.penalties is not None for r in rows)  # a step variant of its own, as are logprobs
        self._load(rows, size, table_changes, penalized)
        choice = token_choice(rows)
        want = any(r.logprobs is not None for r in rows)  # a step variant of its own: the others skip the top-k
        out = torch.empty(num_steps, size, dtype=torch.int64, device=self.device)
        if want:
            chosen = torch.empty(num_steps, size, dtype=torch.float32, device=self.device)
            values = torch.empty(num_steps, size, self.num_top, dtype=torch.float32, device=self.device)
            ids = torch.empty(num_steps, size, self.num_top, dtype=torch.int64, device=self.device)
        for i in range(num_steps):
            self._run_step(size, choice, want, penalized)
            out[i].copy_(self.tokens[:size])
            if want:
                chosen[i].copy_(self.chosen_logprobs[:size])
                values[i].copy_(self.top_logprobs[:size])
                ids[i].copy_(self.top_ids[:size])
        host = out.T.tolist()
        tokens = [host[r.slot] for r in rows]
        if not want:
            return tokens, None
        return tokens, with_logprobs(rows, tokens, chosen, values, ids, [r.slot for r in rows])

    @torch.inference_mode()
    def capture_decode_steps(self) -> list[tuple[int, float]]:
        """Capture the decode step of every bucket now (each of `TOKEN_CHOICES`), as the first decode of each
        would, so that no later step pays compilation or capture; returns (bucket, seconds) per bucket.
        The steps run over idle rows: call it with no sequence decoding. Nothing to do without CUDA graphs."""
        if not self.cuda_graphs:
            return []
        if self.pool.reserve_rows(self.buckets[-1]):  # the largest first: growing later would drop the graphs
            self.drop_graphs()
        times = []
        for size in self.buckets:
            start = time.perf_counter()
            for choice in TOKEN_CHOICES:
                self._load([], size, [], False)
                self._run_step(size, choice, False, False)
            torch.cuda.synchronize(self.device)
            times.append((size, time.perf_counter() - start))
        return times

    def _load(self, rows: list[DecodeRow], size: int, table_changes: list[TableChange], penalized: bool) -> None:
        """Fill the first `size` rows of the step buffers: the given rows, the rest idle (null block); with
        `penalized`, their penalties too."""
        slots = [r.slot for r in rows]
        self.tables.apply(table_changes, set(slots), size)
        self.block_tables[:size].copy_(torch.from_numpy(self.tables.host[:size]))
        if self.inputs_copied is not None:
            self.inputs_copied.synchronize()  # the last load's copies have read the host arrays
        for fields, host, inputs in self.step_inputs:
            values = host.numpy()
            values[:, :size] = np.array(list(fields.values()), dtype=values.dtype)[:, None]
            values[:, slots] = np.array([[getattr(r, f) for f in fields] for r in rows], dtype=values.dtype).T
            inputs[:, :size].copy_(host[:, :size], non_blocking=True)
        if self.inputs_copied is not None:
            self.inputs_copied.record()
        if penalized:
            if self.penalties is None:
                self.penalties = Penalties(self.max_num_seqs, self.config.vocab_size, self.device)
            self.penalties.load([(r.slot, r.penalties) for r in rows], size)

    def _run_step(self, size: int, choice: str, logprobs: bool, penalized: bool) -> None:
        if not self.cuda_graphs:
            self._step(size, choice, logprobs, penalized)
            return
        key = (size, choice, logprobs, penalized)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        # The first step of a bucket runs eagerly (it compiles kernels and is a real step); the capture
        # afterwards only records, so stateful methods see each step once.
        self._step(size, choice, logprobs, penalized)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            self._step(size, choice, logprobs, penalized)
        self.graphs[key] = graph

    def _step(self, size: int, choice: str, logprobs: bool, penalized: bool) -> None:
        """One decode step of the first `size` slots, in place on the step buffers (capturable)."""
        batch, positions, pool, method = self.batch(size), self.positions[:size], self.pool, self.method
        self.seq_lens[:size].copy_(positions + 1)
        method.begin_step(batch)
        store_blocks = batch.block_tables.gather(1, (positions // self.block_size)[:, None]).squeeze(1)
        offsets = positions % self.block_size

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            pool.store(layer, store_blocks, offsets, k, v)
            return method.attend(layer, q, pool, batch)

        logits = self.model.decode_logits(self.tokens[:size], positions, attention, fused=self.fused,
                                          rope_table=self.rope_table)
        scored = self.penalties.apply(logits) if penalized else logits  # log-probabilities stay the raw ones
        if choice == "greedy":
            tokens = scored.argmax(dim=-1)
        elif choice == "sampled":
            tokens = sample_unfiltered(scored, self.temperature[:size], self.seeds[:size], positions + 1)
        else:
            tokens = sample_tokens(scored, self.temperature[:size], self.top_p[:size], self.top_k[:size],
                                   self.seeds[:size], positions + 1, self.penalties.min_p[:size] if penalized else None)
        if penalized:
            self.penalties.count(tokens)
        self.tokens[:size].copy_(tokens)
        if logprobs:
            chosen, values, ids = token_logprobs(logits, tokens, self.num_top)
            self.chosen_logprobs[:size].copy_(chosen)
            self.top_logprobs[:size].copy_(values)
            self.top_ids[:size].copy_(ids)
        positions += 1
        self.steps[:size] += 1


def with_logprobs(rows: list[DecodeRow], tokens: list[list[int]], chosen: torch.Tensor, values: torch.Tensor,
                  ids: torch.Tensor, columns: Iterable[int]) -> list[list[TokenLogprob] | None]:
    """Per row, the `TokenLogprob` of each of its tokens with the row's number of top tokens (None where the row
    did not ask): row j's step-i token is at [i, columns[j]] of chosen [steps, n] and [i, columns[j], :] of
    values and ids [steps, n, top]."""
    chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
    return [None if row.logprobs is None else
            [TokenLogprob(t, chosen[i][c], list(zip(ids[i][c][: row.logprobs], values[i][c][: row.logprobs])))
             for i, t in enumerate(row_tokens)] for row, row_tokens, c in zip(rows, tokens, columns)]
