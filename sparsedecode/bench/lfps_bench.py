"""LFPS measurements, run as `sparsedecode bench` subcommands: (a) `lfps-recall`, recall of the exact top-k
while a real model decodes; (b) `lfps-index`, index time of LFPS candidate scoring against an exact top-k
over all keys; (c) `offload`, KV offload: what fits, and a long run; (d) `lfps-check`, correctness checks
of lfps and of offloaded decoding.

(a) The model decodes a long prompt greedily with dense attention. At every step and layer a probe
computes the exact block scores of every KV head (the per-block log-sum-exp over all keys) and the exact
top-k, and plays LFPS from its own history for each setting (block size, refresh interval R, expand): on
refresh steps its selection is the exact top-k, in between it scores only its candidates (the exact
scores restricted to them, renormalised over them, which is what the op's candidate pass computes) and
keeps their top-k. Reported per setting, averaged over steps, layers, sequences and KV heads: block
recall (share of the exact top-k blocks selected), token recall (share of the exact top-k tokens, by
aggregated attention probability, inside the selected blocks; its ceiling is that of the exact top-k
blocks, the best any block selection of that size does), the attention mass captured relative to the
exact top-k's, the candidates' share of the context (predicted steps), the share of the context a step
reads on average (refresh steps read everything), and the relative error of the attention output against
dense for the two output modes (`attend="candidates"`, `"selected"`).
(b) One layer of the Llama-3.1-8B shape (32 query / 8 KV heads, d=128, bf16 keys): exact block scores
over all keys + top-k, against LFPS candidates + scores over the candidates + top-k, both with
`block_lse` (keys only) on the GPU and on one CPU core; on the GPU also the fused op (attention output
and scores in one pass) over full rows against candidate rows. The previous selection is random, so its
candidates overlap less than real ones do (an upper bound).
(c) Per context, the memory dense decoding and offloaded decoding need (GPU, host) for a model shape;
then `lfps` decoding from an offloaded KV pool (`LLM(kv_offload=...)`) of a chosen context (random K/V
or a real prefill): median step time per step kind and the GPU memory peak.
(d) Dense against lfps with a budget covering the context (equal), CUDA-graph replay against eager
decoding (equal), and, with an `OffloadConfig`, offloaded decoding against on-device decoding.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch

from ..core import DecodeBatch, KVPool
from ..engine import LLM, SamplingParams
from ..engine.model_runner import DecodeRow
from ..kernels import gather_blocks, sparse_decode_attention
from ..methods.dense import Dense
from ..methods.lfps import PastSelection, candidate_offsets, lfps_candidates
from ..core.selection import BlockSelector, block_scores
from ..models.config import ModelConfig
from ..models.shapes import SHAPES
from ..offload import OffloadConfig
from ..offload.scoring import block_lse
from .common import markdown_table, median_time, prompts, write_atomic

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
    buffers) and offloaded with the index on the GPU (the keys move from host to GPU). All also hold one
    chunk's K/V prefix expanded to the query heads (prefill_attention)."""
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
        gpu_dense = weights + kv + expanded
        gpu_offload = weights + 2 * hidden * n + 2 * (2 * kv_heads * head_dim * 2 * n) + expanded
        gpu_index = gpu_offload + kv // 2  # index="gpu": the keys live on the GPU, the values on the host
        rows.append(dict(shape=shape, context=n, kv_gib=kv / 2**30, dense_gpu_gib=gpu_dense / 2**30,
                         offload_gpu_gib=gpu_offload / 2**30, offload_host_gib=kv / 2**30,
                         offload_gpu_index_gpu_gib=gpu_index / 2**30, offload_gpu_index_host_gib=kv / 2 / 2**30,
                         dense_fits=gpu_dense <= gpu_bytes,
                         offload_fits=gpu_offload <= gpu_bytes and kv <= host_bytes,
                         offload_gpu_index_fits=gpu_index <= gpu_bytes and kv // 2 <= host_bytes))
    return rows


def run_offload(model: str, context: int, steps: int, device: str | None, options: dict[str, Any],
                config: OffloadConfig, fill: str, warmup: int = 2) -> dict[str, Any]:
    """`lfps` decoding from an offloaded KV pool holding one sequence of `context` tokens: the median step
    time per kind of step (refresh / default) over `steps` decode steps after `warmup` untimed ones (the
    first of each kind compiles kernels), and the memory it took. fill "prefill": a real prefill of a
    prompt through the engine, whose steps are timed; "random": random K/V stored into blocks 1 .. n of
    the pool (speed does not depend on the values; a prefill of 512K tokens of an 8B model takes
    minutes), and the engine's runner decodes that block table (the engine holds no sequence then)."""
    total = warmup + steps
    llm = LLM(model, method="lfps", device=device, max_context=context + total + 1, max_num_seqs=1,
              enable_prefix_caching=False, kv_offload=config, **options)
    engine, runner = llm.engine, llm.engine.runner
    on_gpu = llm.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(llm.device)
    t0 = time.perf_counter()
    if fill == "prefill":
        engine.decode_steps = 1
        engine.add_request(_prompt(llm, context), SamplingParams(max_tokens=total + 1, ignore_eos=True))
        while not engine.step():  # until the prefill's last chunk samples the first token
            pass

        def step(i: int) -> None:  # the sequence's decode step i
            engine.step()
    else:
        table = list(range(1, 1 + -(-(context + total) // runner.pool.block_size)))
        _store_random(runner.pool, table, context)
        runner.start_decoding(0, table, context)

        def step(i: int) -> None:
            runner.decode([DecodeRow(0, 1, context + i, i, table)], 1)
    sync()
    fill_seconds = time.perf_counter() - t0
    times: dict[str, list[float]] = {}
    for i in range(total):
        t0 = time.perf_counter()
        step(i)
        sync()
        if i >= warmup:
            kind = "refresh" if llm.method.past.refresh_step(i) else "default"
            times.setdefault(kind, []).append(time.perf_counter() - t0)
    pool = runner.pool
    return dict(model=model, options=options, offload=vars(config), context=context, fill=fill, fill_s=fill_seconds,
                **{f"{kind}_step_ms": 1e3 * median(t) for kind, t in times.items()},
                **{f"{kind}_steps": len(t) for kind, t in times.items()},
                host_kv_gib=pool.host_nbytes() / 2**30, staging_gib=pool.staging_nbytes() / 2**30,
                gpu_keys_gib=(pool.nbytes() - pool.host_nbytes()) / 2**30,
                gpu_peak_gib=torch.cuda.max_memory_allocated(llm.device) / 2**30 if on_gpu else None,
                weights_gib=sum(p.numel() * p.element_size() for p in llm.model.parameters()) / 2**30)


def _store_random(pool: KVPool, table: list[int], length: int) -> None:
    """The same random K/V at positions 0 .. length - 1 of every layer of the sequence whose blocks are `table`."""
    positions = torch.arange(length, device=pool.device)
    block_ids = torch.tensor(table, device=pool.device)[positions // pool.block_size]
    offsets = positions % pool.block_size
    k, v = (torch.randn(length, pool.num_kv_heads, pool.head_dim, device=pool.device).to(pool.dtype) for _ in range(2))
    for layer in range(pool.num_layers):
        pool.store(layer, block_ids, offsets, k, v)


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
