"""LFPS measurements, run as `sparsedecode bench` subcommands: (a) `lfps-recall`, recall of the exact top-k
while a real model decodes; (b) `lfps-index`, index time of LFPS candidate scoring against an exact top-k
over all keys; (c) `offload`, `offload-hits`, `offload-serve`: KV offload, what fits, step times against
the floor, hit rates, serving capacity; (d) `lfps-check`, correctness checks of lfps and of offloaded
decoding.

(a) The model decodes a long prompt greedily with dense attention. At every step and layer a probe
computes the exact block scores of every KV head (the per-block log-sum-exp over all keys) and the exact
top-k, and plays LFPS from its own history for each setting (block size, refresh interval R, expand): on
refresh steps its selection is the exact top-k, in between it scores only its candidates (the exact
scores restricted to them, renormalised over them, which is what the op's candidate pass computes) and
keeps their top-k. Reported per setting, averaged over steps, layers, sequences and KV heads: block
recall (share of the exact top-k blocks selected), token recall (share of the exact top-k tokens, by
aggregated attention probability, inside the selected blocks; its "ceiling" column is that of the exact
top-k blocks, which are the top blocks by attention mass, so another selection can cover a few more of the
top tokens), the attention mass captured relative to the
exact top-k's, the candidates' share of the context (predicted steps), the share of the context a step
reads on average (refresh steps read everything), and the relative error of the attention output against
dense for the two output modes (`attend="candidates"`, `"selected"`).
(b) One layer of the Llama-3.1-8B shape (32 query / 8 KV heads, d=128, bf16 keys): exact block scores
over all keys + top-k, against LFPS candidates + scores over the candidates + top-k, both with
`block_lse` (keys only) on the GPU and on one CPU core; on the GPU also the fused op (attention output
and scores in one pass) over full rows against candidate rows. The previous selection is random, so its
candidates overlap less than real ones do (an upper bound).
(c) Per context, the memory dense decoding and offloaded decoding need (GPU, host) for a model shape;
then `lfps` decoding from an offloaded KV pool (`LLM(kv_offload=...)`) of a chosen context (random K/V,
K/V with a stable top-k, or a real prefill): per step kind the median step time, bytes read from host
memory, hit rate and the floor, against bandwidths measured in the same run (`run_offload`); the hit rate
on real weights and prompts (`run_offload_hits`); sequences held and tokens/s, dense against offloaded
(`run_offload_serving`).
(d) Dense against lfps with a budget covering the context (equal), CUDA-graph replay against eager
decoding (equal), and, with an `OffloadConfig`, offloaded decoding against on-device decoding.
"""
from __future__ import annotations

import json
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from statistics import median
from typing import Any

import torch

from ..core import DecodeBatch, KVPool
from ..engine import LLM, SamplingParams
from ..engine.model_runner import DecodeRow
from ..kernels import gather_blocks, sparse_decode_attention
from ..kernels.gather_host_blocks import gather_host_blocks
from ..methods.dense import Dense
from ..methods.lfps import PastSelection, candidate_offsets, lfps_candidates
from ..core.selection import BlockSelector, block_scores
from ..models.config import ModelConfig
from ..models.shapes import SHAPES
from ..offload import OffloadConfig, TransferCounts
from ..offload.scoring import block_lse
from .common import markdown_table, measure_copy_bandwidth, median_time, prompts, release_memory, write_atomic

REFRESH_INTERVALS = (1, 4, 8, 16, 32)
METRICS = ("block_recall", "block_recall_predicted", "token_recall", "token_recall_ceiling", "mass_ratio",
           "candidate_fraction", "read_fraction", "out_err_candidates", "out_err_selected")


# -- (a) recall ------------------------------------------------------------------------------------
@dataclass
class Tracker:
    """LFPS played from its own history for one setting, with running sums of the metrics."""

    block_size: int
    refresh_every: int
    expand: int
    past: PastSelection
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METRICS, 0))

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] += float(value.sum())
        self.counts[key] += value.numel()

    def means(self) -> dict[str, float | None]:
        return {k: self.sums[k] / self.counts[k] if self.counts[k] else None for k in METRICS}


class RecallProbe(Dense):
    """Dense decoding that also plays LFPS for several settings and scores them (see the module doc).
    Eager only (it reads the whole cache and syncs with the host); handed to `engine.use_method`, never
    registered."""

    name = "lfps-probe"
    defaults = dict(budget=1024, block_sizes=(64,), refresh=REFRESH_INTERVALS, expands=(1,), aggregate="max",
                    sink_blocks=1, local_blocks=1)

    def __init__(self, config: ModelConfig, **options: Any) -> None:
        super().__init__(config, **options)
        o = self.options
        self.trackers = [
            Tracker(bs, r, e, PastSelection(BlockSelector("tokens", o["budget"], bs, o["sink_blocks"], o["local_blocks"]),
                                            e, o["aggregate"], r, None))
            for bs in o["block_sizes"] for r in o["refresh"] for e in o["expands"]
        ]

    def plan(self, pool: KVPool, max_seqs: int, max_blocks: int) -> None:
        for t in self.trackers:
            t.past.plan(pool, max_seqs, max_blocks, self.config.num_heads)

    def reset_slot(self, slot: int) -> None:
        for t in self.trackers:
            t.past.reset_slot(slot)

    def begin_step(self, batch: DecodeBatch) -> None:
        for t in self.trackers:
            t.past.begin_step(batch)

    def attend(self, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        dense, lse = pool.attention(layer, q, batch, self.scale)
        seq_lens = batch.seq_lens
        k = gather_blocks(pool.k[layer], batch.block_tables)  # [B, Hkv, capacity, D]
        size, num_heads, dim = q.shape
        heads = self.config.num_kv_heads
        group = num_heads // heads
        scores = torch.einsum("bhgd,bhtd->bhgt", q.float().view(size, heads, group, dim), k.float()) * self.scale
        pos = torch.arange(k.shape[2], device=q.device)
        scores = scores.masked_fill(pos >= seq_lens.long().view(-1, 1, 1, 1), float("-inf"))
        budget = self.options["budget"]
        token_probs = torch.exp(scores - lse.view(size, heads, group, 1)).amax(2)  # [B, H, T]
        top_tokens = torch.zeros_like(token_probs, dtype=torch.bool)
        top_tokens.scatter_(-1, token_probs.topk(min(budget, int(seq_lens.min())), dim=-1).indices, True)
        for block_size in self.options["block_sizes"]:
            trackers = [t for t in self.trackers if t.block_size == block_size]
            selector, kept = trackers[0].past.selector, trackers[0].past.list_length
            unit_lse = scores.unflatten(-1, (-1, block_size)).logsumexp(-1).view(size, num_heads, -1)
            exact, _ = selector.select(block_scores(unit_lse, lse, heads, self.options["aggregate"]), seq_lens, kept)
            exact_mask = _block_mask(exact, unit_lse.shape[-1])
            ceiling = (exact_mask.repeat_interleave(block_size, dim=-1) & top_tokens).sum(-1) / top_tokens.sum(-1)
            for t in trackers:
                t.add("token_recall_ceiling", ceiling)
                self._play(t, layer, q, pool, batch, unit_lse, lse, dense, top_tokens, exact_mask)
        return dense

    def _play(self, t: Tracker, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch,
              unit_lse: torch.Tensor, lse: torch.Tensor, dense: torch.Tensor, top_tokens: torch.Tensor,
              exact_mask: torch.Tensor) -> None:
        past, bs, size, seq_lens = t.past, t.block_size, batch.size, batch.seq_lens
        group = q.shape[1] // self.config.num_kv_heads
        full = past.full_rows(layer, size)  # the rows refreshing this step
        lists, counts = past.candidates(layer, seq_lens)
        # What the candidate pass scores: every block of a full row, the candidates of the others.
        visited = (_block_mask(lists, past.num_blocks) | full[..., None]).repeat_interleave(group, dim=1)
        past.unit_lse[:size].copy_(unit_lse.masked_fill(~visited, float("-inf")))
        pass_lse = torch.where(full.repeat_interleave(group, dim=1), lse, past.unit_lse[:size].logsumexp(-1))
        past.update(layer, pass_lse, seq_lens, full)
        chosen = _block_mask(past.blocks[layer, :size], past.num_blocks)
        recall = (chosen & exact_mask).sum(-1) / exact_mask.sum(-1).clamp(min=1)
        t.add("block_recall", recall)
        candidate_fraction = counts * bs / seq_lens.view(-1, 1)
        t.add("block_recall_predicted", recall[~full])
        t.add("candidate_fraction", candidate_fraction[~full])
        chosen_tokens = chosen.repeat_interleave(bs, dim=-1)
        t.add("token_recall", (chosen_tokens & top_tokens).sum(-1) / top_tokens.sum(-1).clamp(min=1))
        mass = torch.exp(unit_lse - lse[..., None]).view(*chosen.shape[:2], -1, chosen.shape[-1])
        t.add("mass_ratio", (mass * chosen[:, :, None]).sum(-1) / (mass * exact_mask[:, :, None]).sum(-1))
        t.add("read_fraction", torch.where(full, 1.0, candidate_fraction))
        for key, (blocks, n, rows) in (("out_err_candidates", (lists, counts, full)),
                                       ("out_err_selected", (past.blocks[layer, :size], past.counts[layer, :size], None))):
            out, _ = pool.attention(layer, q, batch, self.scale, bs, blocks, n, rows)
            t.add(key, (out.float() - dense.float()).norm(dim=-1) / dense.float().norm(dim=-1))


def _block_mask(blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[B, H, K] block lists padded with >= num_blocks -> [B, H, num_blocks] bool."""
    mask = torch.zeros(*blocks.shape[:2], num_blocks + 1, dtype=torch.bool, device=blocks.device)
    mask.scatter_(-1, blocks.long().clamp(max=num_blocks), True)
    return mask[..., :num_blocks]


def _prompt(llm: LLM, length: int, haystack: str | None = None) -> list[int]:
    return prompts(llm.tokenizer, llm.config.vocab_size, length, 1, haystack)[0]


def run_recall(model: str, contexts: list[int], steps: int, budget: float, block_sizes: tuple[int, ...],
               expands: tuple[int, ...], refresh: tuple[int, ...] = REFRESH_INTERVALS, device: str | None = None,
               haystack: str | None = None) -> list[dict[str, Any]]:
    """Part (a). `budget` < 1 is a fraction of each context (rounded to the largest block size). The pool's
    blocks are the largest block size, so every setting's blocks tile the cache."""
    llm = LLM(model, device=device, max_context=max(contexts) + steps + 1, block_size=max(block_sizes),
              cuda_graphs=False, max_num_seqs=1, enable_prefix_caching=False)
    rows = []
    for context in contexts:
        tokens = int(budget * context) if budget < 1 else int(budget)
        tokens = max(max(block_sizes), tokens // max(block_sizes) * max(block_sizes))
        probe = RecallProbe(llm.config, budget=tokens, block_sizes=block_sizes, refresh=refresh, expands=expands)
        llm.engine.use_method(probe)
        t0 = time.perf_counter()
        llm.generate([_prompt(llm, context, haystack)], max_new_tokens=steps + 1, stop_token_ids=[])
        seconds = time.perf_counter() - t0
        for t in probe.trackers:
            rows.append(dict(model=model, context=context, budget=tokens, block_size=t.block_size, R=t.refresh_every,
                             expand=t.expand, steps=steps, seconds=round(seconds, 1), **t.means()))
    return rows


# -- (b) index time --------------------------------------------------------------------------------
def run_index(contexts: list[int], device: str, budget: int = 4096, block_size: int = 64, expand: int = 1,
              repeats: int = 20, heads: int = 32, kv_heads: int = 8, head_dim: int = 128) -> list[dict[str, Any]]:
    """Part (b) on `device` ("cuda", or "cpu": run under torch.set_num_threads(1) for one core)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    selector = BlockSelector("tokens", budget, block_size)
    offsets = torch.tensor(candidate_offsets(expand), device=dev)
    scale = head_dim**-0.5
    rows = []
    for context in contexts:
        k = torch.randn(1, kv_heads, context, head_dim, generator=gen, device=dev).to(torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(1, heads, head_dim, generator=gen, device=dev).to(torch.bfloat16)
        lens = torch.tensor([context], dtype=torch.int32, device=dev)
        num_blocks = context // block_size
        kept = selector.list_length(context)
        previous = torch.rand(1, kv_heads, num_blocks, generator=gen, device=dev).topk(kept, dim=-1).indices
        previous = previous.sort(dim=-1).values.to(torch.int32)
        counts = torch.full((1, kv_heads), kept, dtype=torch.int32, device=dev)
        unit_lse = torch.empty(1, heads, num_blocks, device=dev)

        def exact() -> None:
            lse = block_lse(q, k, lens, scale, block_size, None, None, None, unit_lse)
            selector.select(block_scores(unit_lse, lse, kv_heads, "max"), lens, kept)

        def predicted() -> None:
            lists, n = lfps_candidates(previous, counts, lens, block_size, offsets, 1, 1, num_blocks)
            lse = block_lse(q, k, lens, scale, block_size, lists, n, None, unit_lse)
            selector.select(block_scores(unit_lse, lse, kv_heads, "max"), lens, kept)

        lists, n = lfps_candidates(previous, counts, lens, block_size, offsets, 1, 1, num_blocks)
        cases = {"index exact (all keys)": exact, "index lfps (candidates)": predicted}
        if dev.type == "cuda":
            full = torch.ones(1, kv_heads, dtype=torch.bool, device=dev)
            cases["fused op, full rows + scores"] = lambda: sparse_decode_attention(
                q, k, v, lens, scale, block_size, lists, n, full, unit_lse)
            cases["fused op, candidate rows + scores"] = lambda: sparse_decode_attention(
                q, k, v, lens, scale, block_size, lists, n, None, unit_lse)
        times = {name: median_time(fn, repeats=repeats, warmup=2, device=dev).median for name, fn in cases.items()}
        candidates = float(n.float().mean()) * block_size
        base = {"device": _device_label(dev), "context": context, "candidate_tokens": round(candidates),
                "candidate_fraction": candidates / context}
        for name, seconds in times.items():
            rows.append({**base, "case": name, "ms": seconds * 1e3})
        rows.append({**base, "case": "ratio exact / lfps (index)",
                     "ms": None, "ratio": times["index exact (all keys)"] / times["index lfps (candidates)"]})
        if dev.type == "cuda":
            rows.append({**base, "case": "ratio full / candidates (fused op)", "ms": None,
                         "ratio": times["fused op, full rows + scores"] / times["fused op, candidate rows + scores"]})
    return rows


def _device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu x{torch.get_num_threads()} thread(s)"


# -- (c) offload -----------------------------------------------------------------------------------
def fit_table(shape: str, contexts: list[int], gpu_bytes: int, host_bytes: int, prefill_chunk: int = 2048
              ) -> list[dict[str, Any]]:
    """What a context needs at the prefill peak (bf16): dense on the GPU (weights, the whole KV) against
    offloaded (host: the whole KV; GPU: weights, layer-major prefill's hidden states and two layer K/V
    buffers) and offloaded with the index on the GPU (the keys move from host to GPU). The offloaded ones
    also hold one chunk's K/V prefix expanded to the query heads (layer-major prefill's `prefill_attention`);
    dense chunks read their prefix in place (`KVPool.prefill_attention`)."""
    s = SHAPES[shape]
    layers, hidden, heads = s["num_hidden_layers"], s["hidden_size"], s["num_attention_heads"]
    kv_heads, head_dim = s["num_key_value_heads"], s.get("head_dim", hidden // heads)
    params = s["vocab_size"] * hidden * (1 if s["tie_word_embeddings"] else 2) + layers * (
        hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * s["intermediate_size"])
    weights = 2 * params
    rows = []
    for n in contexts:
        kv = 2 * layers * kv_heads * head_dim * 2 * n
        expanded = 2 * heads * head_dim * 2 * n  # one chunk's K/V prefix expanded to the query heads
        gpu_dense = weights + kv
        gpu_offload = weights + 2 * hidden * n + 2 * (2 * kv_heads * head_dim * 2 * n) + expanded
        gpu_index = gpu_offload + kv // 2  # index="gpu": the keys live on the GPU, the values on the host
        rows.append(dict(shape=shape, context=n, kv_gib=kv / 2**30, dense_gpu_gib=gpu_dense / 2**30,
                         offload_gpu_gib=gpu_offload / 2**30, offload_host_gib=kv / 2**30,
                         offload_gpu_index_gpu_gib=gpu_index / 2**30, offload_gpu_index_host_gib=kv / 2 / 2**30,
                         dense_fits=gpu_dense <= gpu_bytes,
                         offload_fits=gpu_offload <= gpu_bytes and kv <= host_bytes,
                         offload_gpu_index_fits=gpu_index <= gpu_bytes and kv // 2 <= host_bytes))
    return rows


HOT_SCALE = 4.0  # keys of fill "hot"'s hot blocks are this much larger: their block scores lead for any query
PINNED_COPY_BYTES = 1 << 30
GATHER_SLABS = 4096  # (block, KV head) slabs per launch when timing the gather kernel alone


def store_keys(pool: KVPool, table: list[int], length: int, hot_blocks: int = 0) -> None:
    """The same random K/V at positions 0 .. length - 1 of every layer of the sequence whose blocks are
    `table`. With `hot_blocks`, per KV head that many random blocks (the first and the newest left out) get
    keys HOT_SCALE times larger: every step's top-k is then mostly those blocks, the locality of real
    text at its most stable (random keys have no structure: their top-k moves from step to step)."""
    device, bs = pool.device, pool.block_size
    positions = torch.arange(length, device=device)
    block_ids = torch.tensor(table, device=device)[positions // bs]
    offsets = positions % bs
    k, v = (torch.randn(length, pool.num_kv_heads, pool.head_dim, device=device) for _ in range(2))
    held = -(-length // bs)
    if hot_blocks:
        hot = torch.rand(pool.num_kv_heads, held - 2, device=device).topk(min(hot_blocks, held - 2)).indices + 1
        scale = torch.ones(pool.num_kv_heads, held, device=device).scatter_(1, hot, HOT_SCALE)
        k *= scale.T.repeat_interleave(bs, dim=0)[:length, :, None]
    k, v = k.to(pool.dtype), v.to(pool.dtype)
    for layer in range(pool.num_layers):
        pool.store(layer, block_ids, offsets, k, v)


def _step_kind(method: Any, step: int) -> str:
    past = getattr(method, "past", None)
    return "refresh" if past is not None and past.refresh_step(step) else "default"


def time_steps(llm: LLM, step: Callable[[int], Any], total: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Decode steps 0 .. total - 1 (`step(i)` runs step i), the first `warmup` untimed: per kind of step
    (refresh / default; every step of a method without refreshes is a default one) the count, the median ms and, over an
    offloaded pool, the median bytes read from host memory per step and the hit rate of those steps."""
    pool = llm.engine.runner.pool
    counts = getattr(pool, "transfer_counts", None)
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {}
    moved: dict[str, list[TransferCounts]] = {}
    for i in range(total):
        before = counts() if counts else None
        sync()
        t0 = time.perf_counter()
        step(i)
        sync()
        seconds = time.perf_counter() - t0
        if i < warmup:
            continue
        kind = _step_kind(llm.method, i)
        times.setdefault(kind, []).append(seconds)
        if counts:
            moved.setdefault(kind, []).append(counts() - before)
    out = {}
    for kind, seconds in times.items():
        row: dict[str, Any] = dict(steps=len(seconds), step_ms=1e3 * median(seconds), total_s=sum(seconds))
        if kind in moved:
            row.update(link_mb=median(m.link_bytes for m in moved[kind]) / 1e6,
                       hit_rate=reduce(operator.add, moved[kind]).hit_rate)
        out[kind] = row
    return out


def pinned_copy_bandwidth(device: torch.device, nbytes: int = PINNED_COPY_BYTES) -> float:
    """Host-to-device bytes/s of one large copy from pinned host memory (cudaMemcpy)."""
    src = torch.randint(1, 255, (nbytes,), dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / median_time(lambda: dst.copy_(src, non_blocking=True), repeats=10, warmup=2, device=device).median


def gather_bandwidth(pool: KVPool, slabs: int = GATHER_SLABS) -> float:
    """Bytes/s from host memory of the offload gather kernel alone: `slabs` random (block, KV head)
    slabs of layer 0's values in host memory, each moved twice (as K and as V), in one launch."""
    width = pool.block_size * pool.head_dim
    host = pool.v[0].view(-1, width)
    n = min(slabs, host.shape[0])
    src = torch.randperm(host.shape[0], device=pool.device)[:n]
    dst = torch.arange(n, device=pool.device)
    targets = [torch.empty(n, width, dtype=pool.dtype, device=pool.device) for _ in range(2)]
    seconds = median_time(lambda: gather_host_blocks(host, host, *targets, src, dst), repeats=10, warmup=2,
                          device=pool.device).median
    return 2 * n * width * pool.dtype.itemsize / seconds


def _decode_steps(llm: LLM, context: int, total: int, fill: str, hot_blocks: int,
                  prompt: list[int] | None = None) -> Callable[[int], Any]:
    """Put one sequence of `context` tokens in the pool (fill "prefill": a real prefill of `prompt`, by
    default one from the essays, through the engine; else K/V stored by `store_keys`, decoded by the
    engine's runner, the engine holding no sequence) and return its step function."""
    engine, runner = llm.engine, llm.engine.runner
    if fill == "prefill":
        engine.decode_steps = 1
        engine.add_request(prompt or _prompt(llm, context), SamplingParams(max_tokens=total + 1, ignore_eos=True))
        while not engine.step():  # until the prefill's last chunk samples the first token
            pass
        return lambda i: engine.step()
    table = list(range(1, 1 + -(-(context + total) // runner.pool.block_size)))
    store_keys(runner.pool, table, context, hot_blocks if fill == "hot" else 0)
    runner.start_decoding(0, table, context)
    return lambda i: runner.decode([DecodeRow(0, 1, context + i, i, table)], 1)


def weights_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for p in llm.model.parameters())


def run_offload(model: str, context: int, steps: int, device: str | None, options: dict[str, Any],
                config: OffloadConfig, fill: str, warmup: int = 2, on_gpu: bool = False
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`lfps` decoding from an offloaded KV pool holding one sequence of `context` tokens, `steps` timed
    decode steps after `warmup` untimed ones (the first compiles kernels and captures the step). fill
    "prefill": a real prefill of a prompt through the engine; "random": random K/V stored into the pool
    (no structure: the top-k moves from step to step, the issue's worst case); "hot": random K/V whose
    top-k hardly changes (`store_keys`). Per kind of step: median ms, bytes read from host memory, the hit rate, the
    link bandwidth that step achieved (bytes / step time) and the floor: the weights read at the
    device-memory bandwidth plus those bytes at the pinned-copy bandwidth, both measured in this run.
    With `on_gpu` the same decoding over an on-device pool follows (where it fits). Returns the rows per
    kind of step and one row of memory and bandwidths."""
    rows, setup = _offloaded_run(model, context, steps, device, options, config, fill, warmup)
    if on_gpu:
        release_memory()
        total = warmup + steps
        llm = LLM(model, method="lfps", device=device, max_context=context + total + 1, max_num_seqs=1,
                  num_blocks=-(-(context + total + 1) // setup["block_size"]) + 1, enable_prefix_caching=False,
                  **options)
        step = _decode_steps(llm, context, total, fill, llm.method.selector.list_length(context))
        rows += [dict(pool="on-GPU", kind=kind, **row) for kind, row in time_steps(llm, step, total, warmup).items()]
    return rows, setup


def _offloaded_run(model: str, context: int, steps: int, device: str | None, options: dict[str, Any],
                   config: OffloadConfig, fill: str, warmup: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    total = warmup + steps
    llm = LLM(model, method="lfps", device=device, max_context=context + total + 1, max_num_seqs=1,
              enable_prefix_caching=False, kv_offload=config, **options)
    on_cuda = llm.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(llm.device)
    t0 = time.perf_counter()
    step = _decode_steps(llm, context, total, fill, llm.method.selector.list_length(context))
    fill_seconds = time.perf_counter() - t0
    kinds = time_steps(llm, step, total, warmup)
    pool, weights = llm.engine.runner.pool, weights_bytes(llm)
    hbm = measure_copy_bandwidth(llm.device) / 2 if on_cuda else None  # read + write: half is the read rate
    pinned = pinned_copy_bandwidth(llm.device) if on_cuda else None
    setup = dict(model=model, options=options, offload=vars(config), context=context, fill=fill, fill_s=fill_seconds,
                 block_size=llm.block_size, graphs=llm.cuda_graphs, host_kv_gib=pool.host_nbytes() / 2**30,
                 staging_gib=pool.staging_nbytes() / 2**30, gpu_keys_gib=(pool.nbytes() - pool.host_nbytes()) / 2**30,
                 gpu_peak_gib=torch.cuda.max_memory_allocated(llm.device) / 2**30 if on_cuda else None,
                 weights_gib=weights / 2**30, hbm_read_gbps=hbm and hbm / 1e9, pinned_copy_gbps=pinned and pinned / 1e9,
                 gather_gbps=gather_bandwidth(pool) / 1e9 if on_cuda else None)
    rows = []
    for kind, row in kinds.items():
        seconds, link = row["step_ms"] / 1e3, row["link_mb"] * 1e6
        floor = weights / hbm + link / pinned if on_cuda else None
        rows.append(dict(pool="offloaded", kind=kind, **row, link_gbps=link / seconds / 1e9,
                         floor_ms=floor and 1e3 * floor, over_floor=floor and seconds / floor))
    return rows, setup


def run_offload_hits(model: str, contexts: list[int], refresh: tuple[int, ...], steps: int, options: dict[str, Any],
                     config: OffloadConfig, suites: tuple[str, ...] = ("needle", "ruler"),
                     ruler_tasks: tuple[str, ...] = ("niah_multikey_2", "vt"), seed: int = 0,
                     device: str | None = None, warmup: int = 2, haystack: str | None = None
                     ) -> list[dict[str, Any]]:
    """The staging pool's hit rate on real weights: `lfps` (with `options`) decoding from an offloaded pool
    after real prompts of each context (the needle at mid-depth, and `ruler_tasks`), per refresh interval
    R, `steps` steps timed after `warmup` (the first fills the empty pool); beside them random K/V of the
    same length (no structure: the worst case). `haystack`: the prompts' filler text (default:
    the essays). Per prompt, R and kind of step: the hit rate, median bytes read from host memory per
    step and median step time."""
    from ..evals.runner import build_samples

    total = warmup + steps
    llm = LLM(model, method="lfps", device=device, max_context=max(contexts) + total + 64, max_num_seqs=1,
              enable_prefix_caching=False, kv_offload=config, **options)
    runs: list[tuple[str, int, list[int] | None]] = []
    for context in contexts:
        for suite in suites:
            chosen = dict(depths=[0.5]) if suite == "needle" else dict(tasks=list(ruler_tasks))
            samples, _ = build_samples(suite, llm.tokenizer, [context], 1, seed, haystack=haystack, **chosen)
            runs += [(s.task, context, llm.tokenizer(s.prompt).input_ids) for s in samples]
        runs.append(("random K/V", context, None))
    rows = []
    for task, context, ids in runs:
        for r in refresh:
            llm.use_method("lfps", **{**options, "refresh_every": r})
            fill = "random" if ids is None else "prefill"
            step = _decode_steps(llm, len(ids) if ids else context, total, fill, 0, prompt=ids)
            for kind, row in time_steps(llm, step, total, warmup).items():
                rows.append(dict(model=model, prompt=task, context=len(ids) if ids else context, R=r, kind=kind,
                                 steps=row["steps"], hit_rate=row["hit_rate"], link_mb=row["link_mb"],
                                 step_ms=row["step_ms"]))
            while llm.engine.has_unfinished_requests():  # the prefilled request's last token
                llm.engine.step()
    return rows


def run_offload_serving(model: str, context: int, steps: int, options: dict[str, Any], pool_blocks: int,
                        sequences: int | None = None, fills: tuple[str, ...] = ("random", "hot"),
                        warmup: int = 3, device: str | None = None, max_dense: int = 64) -> list[dict[str, Any]]:
    """Sequences of `context` tokens decoding together, the KV cache on the GPU (dense) against offloaded
    (lfps `options`, keys on the GPU, values in host memory, `pool_blocks` staging slots per row): dense at
    1, 2, 4, ... sequences up to as many as its pool holds, then offloaded with `sequences` (default twice
    that, fewer where the GPU or host memory does not hold them) for each fill (`store_keys`); dense holds
    at most `max_dense` sequences. Random K/V, decoded by the engine's runner. Per row: sequences, median
    ms per step, tokens/s over all timed steps, and the GiB of K/V on the GPU (offloaded: the keys), of
    K/V in host memory and of the staging pools."""
    rows, capacity = _dense_serving(model, context, steps, warmup, device, max_dense)
    release_memory()
    total = warmup + steps
    max_context = context + total + 1
    wanted = sequences or 2 * capacity
    # The pool sized by the engine: keys on the GPU (what the staging pools of `wanted` rows leave), values
    # in host memory, as many blocks as both hold.
    llm = LLM(model, method="lfps", device=device, max_context=max_context, max_num_seqs=wanted,
              enable_prefix_caching=False, kv_offload=OffloadConfig(index="gpu", pool_blocks=pool_blocks), **options)
    count = min(wanted, _sequences_held(llm, max_context))
    tables = _tables(llm, max_context, count)
    for fill in fills:
        for table in tables:
            store_keys(llm.engine.runner.pool, table, context,
                       llm.method.selector.list_length(context) if fill == "hot" else 0)
        rows.append(_serve_row(llm, "offloaded", fill, tables, context, total, warmup))
    return rows


def _sequences_held(llm: LLM, max_context: int) -> int:
    """How many sequences of `max_context` tokens the engine's pool holds (block 0 is the null block)."""
    return (llm.engine.runner.pool.num_blocks - 1) // -(-max_context // llm.block_size)


def _tables(llm: LLM, max_context: int, count: int) -> list[list[int]]:
    """Block tables of `count` sequences of `max_context` tokens in consecutive blocks from block 1."""
    per_sequence = -(-max_context // llm.block_size)
    if count * per_sequence >= llm.engine.runner.pool.num_blocks:
        raise RuntimeError(f"{count} sequences of {max_context} tokens do not fit the pool's "
                           f"{llm.engine.runner.pool.num_blocks} blocks")
    return [list(range(1 + i * per_sequence, 1 + (i + 1) * per_sequence)) for i in range(count)]


def _dense_serving(model: str, context: int, steps: int, warmup: int, device: str | None,
                   max_sequences: int) -> tuple[list[dict[str, Any]], int]:
    """Dense decoding of 1, 2, 4, ... sequences up to as many as the GPU's KV pool holds (at most
    `max_sequences`); the rows and that number."""
    total = warmup + steps
    max_context = context + total + 1
    llm = LLM(model, method="dense", device=device, max_context=max_context, max_num_seqs=max_sequences,
              enable_prefix_caching=False)
    capacity = min(max_sequences, _sequences_held(llm, max_context))
    if capacity < 1:
        raise RuntimeError(f"the GPU holds no sequence of {context} tokens with dense attention")
    tables = _tables(llm, max_context, capacity)
    for table in tables:
        store_keys(llm.engine.runner.pool, table, context)
    batches = sorted({*(1 << i for i in range(capacity.bit_length())), capacity})
    return [_serve_row(llm, "dense", "random", tables[:n], context, total, warmup) for n in batches], capacity


def _serve_row(llm: LLM, pool: str, fill: str, tables: list[list[int]], context: int, total: int,
               warmup: int) -> dict[str, Any]:
    runner = llm.engine.runner
    for slot, table in enumerate(tables):
        runner.start_decoding(slot, table, context)

    def step(i: int) -> None:
        runner.decode([DecodeRow(slot, 1, context + i, i, table) for slot, table in enumerate(tables)], 1)

    kinds = time_steps(llm, step, total, warmup)
    host_bytes = runner.pool.host_nbytes()
    steps = sum(k["steps"] for k in kinds.values())
    seconds = sum(k["total_s"] for k in kinds.values())
    return dict(pool=pool, fill=fill, sequences=len(tables), context=context,
                **{f"{kind}_step_ms": kinds.get(kind, {}).get("step_ms") for kind in ("default", "refresh")},
                tokens_per_s=len(tables) * steps / seconds, hit_rate=kinds.get("default", {}).get("hit_rate"),
                gpu_kv_gib=(runner.pool.nbytes() - host_bytes) / 2**30, host_kv_gib=host_bytes / 2**30,
                staging_gib=runner.pool.staging_nbytes() / 2**30)


# -- (d) the checks --------------------------------------------------------------------------------
def _decode_outputs(llm: LLM, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and every attention output (eager decoding: outputs recorded in a captured step
    would be the capture's)."""
    outputs: list[torch.Tensor] = []
    method = llm.method
    attend = method.attend

    def recorded(layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        out = attend(layer, q, pool, batch)
        outputs.append(out.float().clone())
        return out

    llm.cuda_graphs = False
    method.attend = recorded
    return llm.generate([ids], max_new_tokens=steps, stop_token_ids=[])[0].token_ids, outputs


def run_check(model: str, context: int, steps: int, device: str | None, options: dict[str, Any],
              config: OffloadConfig | None) -> list[dict[str, Any]]:
    """lfps: a budget covering the context equals dense; CUDA-graph replay equals eager decoding (on a CPU
    both run eagerly); with `config`, offloaded decoding against on-device decoding: tokens, and the
    attention outputs up to the first differing token (bit-identical with the GPU index; the CPU index
    rounds its scores differently, which flips near-ties of the top-k, and random weights have many).
    Prefix caching is off, so every generation prefills the same way."""
    engine_options = dict(device=device, max_context=context + steps + 1, max_num_seqs=1, enable_prefix_caching=False)
    torch.manual_seed(0)  # random weights are drawn from it: the offloaded engine below gets the same
    llm = LLM(model, **engine_options)
    ids = _prompt(llm, context)
    rows = []
    dense = llm.generate([ids], max_new_tokens=steps, stop_token_ids=[])[0].token_ids
    covering = -(-llm.max_context // llm.block_size) * llm.block_size
    llm.use_method("lfps", **{**options, "budget": covering})
    full = llm.generate([ids], max_new_tokens=steps, stop_token_ids=[])[0].token_ids
    rows.append(dict(check="lfps, budget covering the context == dense", passed=full == dense))
    llm.use_method("lfps", **options)
    graphs = llm.generate([ids], max_new_tokens=steps, stop_token_ids=[])[0].token_ids
    eager, outputs = _decode_outputs(llm, ids, steps)
    rows.append(dict(check="lfps, CUDA-graph replay == eager", passed=graphs == eager))
    if config is None:
        return rows
    del llm
    torch.manual_seed(0)
    offloaded = LLM(model, method="lfps", kv_offload=config, **engine_options, **options)
    tokens, offloaded_outputs = _decode_outputs(offloaded, ids, steps)
    same = next((i for i, (a, b) in enumerate(zip(tokens, eager)) if a != b), len(tokens))
    layers = offloaded.config.num_layers
    pairs = list(zip(offloaded_outputs[: same * layers], outputs[: same * layers]))
    errors = [float((a - b).norm() / b.norm()) for a, b in pairs]
    rows.append(dict(check=f"offloaded == on-device ({vars(config)})", passed=tokens == eager,
                     same_tokens=same, identical_outputs=all(torch.equal(a, b) for a, b in pairs),
                     max_rel_err=max(errors, default=None)))
    return rows


# -- output ----------------------------------------------------------------------------------------
def save_table(out: Path, name: str, rows: list[dict[str, Any]] | dict[str, Any],
               columns: list[str] | None = None) -> str:
    """Write `name`.json and `name`.md (the markdown table) into `out`; returns the table."""
    write_atomic(out / f"{name}.json", json.dumps(rows, indent=1, default=str))
    table = markdown_table(rows if isinstance(rows, list) else [rows], columns)
    write_atomic(out / f"{name}.md", table + "\n")
    return table
