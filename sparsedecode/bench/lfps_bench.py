"""LFPS measurements: (a) recall of the exact top-k while a real model decodes, (b) index time of LFPS
candidate scoring against an exact top-k over all keys, (c) KV offload: what fits, and a long run,
(d) correctness checks of lfps and of offloaded decoding on the GPU.

(a) `recall`: the model decodes a long prompt greedily with dense attention. At every step and layer a
probe computes the exact block scores of every KV head (the op's per-block log-sum-exp over all keys)
and the exact top-k, and plays LFPS from its own history for each setting (block size, refresh interval
R, expand): on refresh steps its selection is the exact top-k, in between it scores only its candidates
(the exact scores restricted to them, renormalised over them, which is what the op's candidate pass
computes) and keeps their top-k. Reported per setting, averaged over steps, layers, sequences and KV
heads: block recall (share of the exact top-k blocks selected), token recall (share of the exact top-k
tokens, by aggregated attention probability, inside the selected blocks; its ceiling is that of the exact
top-k blocks, the best any block selection of that size does), the attention mass captured
relative to the exact top-k's, the candidates' share of the context (predicted steps), the share of the
context a step reads on average (refresh steps read everything), and the relative error of the
attention output against dense for the two output modes (`attend="candidates"`, `"selected"`).
(b) `index`: one layer of the Llama-3.1-8B shape (32 query / 8 KV heads, d=128, bf16 keys), contexts
32K-128K: exact block scores over all keys + top-k, against LFPS candidates + scores over the
candidates + top-k, both with `block_lse` (keys only) on the GPU and on one CPU core; on the GPU also
the fused op (attention output and scores in one pass) over full rows against candidate rows. The
previous selection is random, so its candidates overlap less than real ones do (an upper bound).
(c) `offload`: per context, the memory dense decoding and offloaded decoding need (GPU, host) for a model
shape; then `lfps` decoding from an offloaded cache of a chosen context (random K/V or a real prefill):
median step time per step kind (refresh / predicted) and the GPU memory peak.
(d) `check`: on the GPU, lfps with a budget covering the context equals dense (CUDA graphs), graph
replay equals eager decoding, and offloaded decoding follows on-device decoding.

Each part prints markdown tables and writes JSON into the output folder; `--tiny` runs a seconds-long
CPU version of every part.
"""
from __future__ import annotations

import json
import os
import time
from statistics import median
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from ..data.haystack import haystack_text
from ..engine.kv_cache import KVCache
from ..engine.llm import CAPACITY_MULTIPLE, LLM
from ..kernels import sparse_decode_attention
from ..methods.base import register
from ..methods.dense import Dense
from ..methods.lfps import PastSelection, lfps_candidates
from ..methods.selection import BlockSelector, block_scores
from ..models.config import ModelConfig
from ..models.shapes import SHAPES
from ..offload import OffloadConfig
from ..offload.scoring import block_lse, torch_threads
from .common import markdown_table, median_time, write_atomic

REFRESH_INTERVALS = (1, 4, 8, 16, 32)
METRICS = ("block_recall", "block_recall_predicted", "token_recall", "token_recall_ceiling", "mass_ratio",
           "candidate_fraction",
           "read_fraction", "out_err_candidates", "out_err_selected")


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


@register
class RecallProbe(Dense):
    """Dense decoding that also plays LFPS for several settings and scores them (see the module doc)."""

    name = "lfps-probe"
    defaults = dict(budget=1024, block_sizes=(64,), refresh=REFRESH_INTERVALS, expands=(1,), aggregate="max",
                    sink_blocks=1, local_blocks=1)

    def __init__(self, config: ModelConfig, **options: Any) -> None:
        super().__init__(config, **options)
        o = self.options
        self.trackers = [
            Tracker(bs, r, e, PastSelection(BlockSelector("tokens", o["budget"], bs, o["sink_blocks"], o["local_blocks"]),
                                            e, o["aggregate"], None))
            for bs in o["block_sizes"] for r in o["refresh"] for e in o["expands"]
        ]
        self.step = -1

    def plan(self, cache: KVCache) -> None:
        for t in self.trackers:
            t.past.plan(cache, self.config.num_heads)

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor) -> torch.Tensor:
        self.step += layer == 0
        k, v = cache.k[layer], cache.v[layer]
        dense, lse = sparse_decode_attention(q, k, v, seq_lens, self.scale)
        batch, num_heads, dim = q.shape
        heads, group = self.config.num_kv_heads, num_heads // self.config.num_kv_heads
        scores = torch.einsum("bhgd,bhtd->bhgt", q.float().view(batch, heads, group, dim), k.float()) * self.scale
        pos = torch.arange(cache.capacity, device=q.device)
        scores = scores.masked_fill(pos >= seq_lens.long().view(-1, 1, 1, 1), float("-inf"))
        budget = self.options["budget"]
        token_probs = torch.exp(scores - lse.view(batch, heads, group, 1)).amax(2)  # [B, H, T]
        top_tokens = torch.zeros_like(token_probs, dtype=torch.bool)
        top_tokens.scatter_(-1, token_probs.topk(min(budget, int(seq_lens.min())), dim=-1).indices, True)
        for block_size in self.options["block_sizes"]:
            trackers = [t for t in self.trackers if t.block_size == block_size]
            selector, kept = trackers[0].past.selector, trackers[0].past.list_length
            unit_lse = scores.unflatten(-1, (-1, block_size)).logsumexp(-1).view(batch, num_heads, -1)
            exact, _ = selector.select(block_scores(unit_lse, lse, heads, self.options["aggregate"]), seq_lens, kept)
            exact_mask = _block_mask(exact, unit_lse.shape[-1])
            ceiling = (exact_mask.repeat_interleave(block_size, dim=-1) & top_tokens).sum(-1) / top_tokens.sum(-1)
            for t in trackers:
                t.add("token_recall_ceiling", ceiling)
                self._play(t, layer, q, k, v, seq_lens, unit_lse, lse, dense, top_tokens, exact_mask)
        return dense

    def _play(self, t: Tracker, layer: int, q, k, v, seq_lens, unit_lse, lse, dense, top_tokens, exact_mask) -> None:
        past, bs = t.past, t.block_size
        heads = self.config.num_kv_heads
        refresh = self.step % t.refresh_every == 0
        lists, counts = past.candidates(layer, seq_lens)
        if refresh:
            past.unit_lse.copy_(unit_lse)
            pass_lse = lse
        else:
            visited = _block_mask(lists, past.num_blocks).repeat_interleave(q.shape[1] // heads, dim=1)
            past.unit_lse.copy_(unit_lse.masked_fill(~visited, float("-inf")))
            pass_lse = past.unit_lse.logsumexp(-1)
        past.update(layer, pass_lse, seq_lens, past.full_rows(layer, refresh))
        chosen = _block_mask(past.blocks[layer], past.num_blocks)
        recall = (chosen & exact_mask).sum(-1) / exact_mask.sum(-1).clamp(min=1)
        t.add("block_recall", recall)
        if not refresh:
            t.add("block_recall_predicted", recall)
            t.add("candidate_fraction", counts * bs / seq_lens.view(-1, 1))
        chosen_tokens = chosen.repeat_interleave(bs, dim=-1)
        t.add("token_recall", (chosen_tokens & top_tokens).sum(-1) / top_tokens.sum(-1).clamp(min=1))
        mass = torch.exp(unit_lse - lse[..., None]).view(*chosen.shape[:2], -1, chosen.shape[-1])
        t.add("mass_ratio", (mass * chosen[:, :, None]).sum(-1) / (mass * exact_mask[:, :, None]).sum(-1))
        t.add("read_fraction", torch.ones_like(recall) if refresh else counts * bs / seq_lens.view(-1, 1))
        scale = self.scale
        full = past.full_rows(layer, refresh)
        for key, (blocks, n, rows) in (("out_err_candidates", (lists, counts, full)),
                                       ("out_err_selected", (past.blocks[layer], past.counts[layer], None))):
            out, _ = sparse_decode_attention(q, k, v, seq_lens, scale, bs, blocks, n, rows)
            t.add(key, (out.float() - dense.float()).norm(dim=-1) / dense.float().norm(dim=-1))


def _block_mask(blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[B, H, K] block lists padded with >= num_blocks -> [B, H, num_blocks] bool."""
    mask = torch.zeros(*blocks.shape[:2], num_blocks + 1, dtype=torch.bool, device=blocks.device)
    mask.scatter_(-1, blocks.long().clamp(max=num_blocks), True)
    return mask[..., :num_blocks]


def prompt_ids(llm: LLM, length: int, haystack: str | None) -> list[int]:
    """`length` tokens of the haystack text (repeated if short); random ids for random-weight models."""
    if llm.tokenizer is None:
        return torch.randint(1, llm.config.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    text = haystack_text(haystack)[: 8 * length]
    ids = llm.tokenizer(text, add_special_tokens=False).input_ids
    return (ids * -(-length // len(ids)))[:length]


def run_recall(model: str, contexts: list[int], steps: int, budget: float, block_sizes: tuple[int, ...],
               expands: tuple[int, ...], refresh: tuple[int, ...] = REFRESH_INTERVALS, device: str | None = None,
               haystack: str | None = None) -> list[dict[str, Any]]:
    """Part (a). `budget` < 1 is a fraction of each context (rounded to the largest block size)."""
    llm = LLM(model, device=device, max_context=max(contexts) + steps + 128, cuda_graphs=False)
    rows = []
    for context in contexts:
        tokens = int(budget * context) if budget < 1 else int(budget)
        tokens = max(max(block_sizes), tokens // max(block_sizes) * max(block_sizes))
        llm.use_method("lfps-probe", budget=tokens, block_sizes=block_sizes, refresh=refresh, expands=expands)
        t0 = time.perf_counter()
        llm.generate([prompt_ids(llm, context, haystack)], max_new_tokens=steps + 1, stop_token_ids=[])
        seconds = time.perf_counter() - t0
        for t in llm.method.trackers:
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
    offsets = torch.tensor(sorted(set(range(-expand, expand + 1)) | {0, 1}), device=dev)
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
    """`lfps` decoding from an offloaded cache of `context` tokens: the median step time per step kind
    over `steps` steps after `warmup` untimed ones (the first of each kind compiles kernels), and the
    memory it took. fill "prefill": a real (layer-major) prefill of a prompt; "random": random K/V
    written straight into the cache, as the end-to-end benchmark does for random-weight shapes (speed
    does not depend on the values; a prefill of 512K tokens of an 8B model takes minutes)."""
    llm = LLM(model, method="lfps", device=device, max_context=context + steps + 128, kv_offload=config, **options)
    on_gpu = llm.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(llm.device)
    cache = llm._cache_for(1, KVCache.capacity_for(context + steps, CAPACITY_MULTIPLE))
    t0 = time.perf_counter()
    if fill == "prefill":
        hidden = llm._prefill(prompt_ids(llm, context, None), 0, cache)
        token = llm.model.logits(hidden).argmax().view(1)
    else:
        shape = (cache.num_kv_heads, context, cache.head_dim)
        k, v = (torch.randn(shape, device=llm.device).to(llm.dtype) for _ in range(2))
        for layer in range(cache.num_layers):
            cache.write(layer, 0, 0, k, v)
        del k, v
        token = torch.ones(1, dtype=torch.long, device=llm.device)
    sync()
    fill_seconds = time.perf_counter() - t0
    positions = torch.tensor([context], device=llm.device)
    times: dict[str, list[float]] = {}
    for step in range(warmup + steps):
        variant = llm.method.step_variant(step)
        t0 = time.perf_counter()
        token = llm._decode(variant, token, positions, cache).argmax(-1)
        sync()
        if step >= warmup:
            times.setdefault(variant, []).append(time.perf_counter() - t0)
        positions += 1
    return dict(model=model, options=options, offload=vars(config), context=context, fill=fill,
                fill_s=fill_seconds, **{f"{v}_step_ms": 1e3 * median(t) for v, t in times.items()},
                **{f"{v}_steps": len(t) for v, t in times.items()},
                host_kv_gib=cache.host_nbytes() / 2**30, pool_gib=cache.pool_nbytes() / 2**30,
                gpu_keys_gib=(cache.nbytes() - cache.host_nbytes()) / 2**30,
                gpu_peak_gib=torch.cuda.max_memory_allocated(llm.device) / 2**30 if on_gpu else None,
                weights_gib=sum(p.numel() * p.element_size() for p in llm.model.parameters()) / 2**30)


# -- (d) the GPU checks ----------------------------------------------------------------------------
def _decode_outputs(llm: LLM, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and, when the step runs eagerly, every attention output."""
    outputs: list[torch.Tensor] = []
    attend = llm.method.attend

    def recorded(layer, q, cache, seq_lens):
        out = attend(layer, q, cache, seq_lens)
        outputs.append(out.float().clone())
        return out

    llm.method.attend = recorded
    return llm.generate([ids], max_new_tokens=steps, stop_token_ids=[])[0].token_ids, outputs


def run_check(model: str, context: int, steps: int, device: str | None, options: dict[str, Any],
              config: OffloadConfig) -> list[dict[str, Any]]:
    """lfps on the GPU: a budget covering the context equals dense bit for bit; CUDA-graph replay equals
    eager decoding; offloaded decoding against on-device decoding: tokens, and the attention outputs
    up to the first differing token (bit-identical with the GPU index; the CPU index rounds its scores
    differently, which flips near-ties of the top-k, and random weights have many)."""
    rows = []
    torch.manual_seed(0)
    llm = LLM(model, device=device, max_context=context + steps + 128)
    ids = prompt_ids(llm, context, None)
    dense = llm.generate([ids], max_new_tokens=steps, stop_token_ids=[])[0].token_ids
    llm.use_method("lfps", **{**options, "budget": KVCache.capacity_for(context + steps, CAPACITY_MULTIPLE)})
    full = llm.generate([ids], max_new_tokens=steps, stop_token_ids=[])[0].token_ids
    rows.append(dict(check="lfps, budget covering the context == dense (graphs)", passed=full == dense))
    llm.use_method("lfps", **options)
    graphs = llm.generate([ids], max_new_tokens=steps, stop_token_ids=[])[0].token_ids
    llm.cuda_graphs = False
    eager, outputs = _decode_outputs(llm, ids, steps)
    rows.append(dict(check="lfps, CUDA-graph replay == eager", passed=graphs == eager))
    del llm
    torch.manual_seed(0)
    offloaded = LLM(model, method="lfps", device=device, max_context=context + steps + 128, kv_offload=config, **options)
    tokens, outputs2 = _decode_outputs(offloaded, ids, steps)
    same = next((i for i, (a, b) in enumerate(zip(tokens, eager)) if a != b), len(tokens))
    layers = offloaded.config.num_layers
    pairs = list(zip(outputs2[: same * layers], outputs[: same * layers]))
    errors = [float((a - b).norm() / b.norm()) for a, b in pairs]
    rows.append(dict(check=f"offloaded == on-device ({vars(config)})", passed=tokens == eager,
                     same_tokens=same, identical_outputs=all(torch.equal(a, b) for a, b in pairs),
                     max_rel_err=max(errors, default=None)))
    return rows


# -- the command line ------------------------------------------------------------------------------
def _tokens(text: str) -> list[int]:
    from .cli import parse_tokens

    return [parse_tokens(t) for t in text.split(",") if t.strip()]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _save(out: Path, name: str, rows: Any, columns: list[str] | None = None) -> None:
    write_atomic(out / f"{name}.json", json.dumps(rows, indent=1, default=str))
    table = markdown_table(rows if isinstance(rows, list) else [rows], columns)
    click.echo(f"\n### {name}\n\n{table}\n")
    write_atomic(out / f"{name}.md", table + "\n")


@click.group()
def main() -> None:
    """LFPS benchmarks (parts a, b, c); `--tiny` for a quick CPU run."""


@main.command("recall")
@click.option("--model", default="qwen2.5-coder-1.5b", show_default=True)
@click.option("--contexts", default="8k,16k,32k", show_default=True)
@click.option("--steps", default=96, show_default=True, help="decode steps per context")
@click.option("--budget", default=0.03, show_default=True, help="top-k tokens, or a fraction of the context if < 1")
@click.option("--block-sizes", default="64,16", show_default=True)
@click.option("--expands", default="0,1", show_default=True)
@click.option("--haystack", default=None, help="prompt text file or folder (default: the essays)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/lfps"), show_default=True)
@click.option("--tiny", is_flag=True, help="random:tiny-llama on CPU, 1K context, 16 steps")
def recall_command(model, contexts, steps, budget, block_sizes, expands, haystack, out, tiny) -> None:
    device = None
    if tiny:
        model, contexts, steps, budget, device = "random:tiny-llama", "1k", 16, 128, "cpu"
    rows = run_recall(model, _tokens(contexts), steps, budget, _ints(block_sizes), _ints(expands),
                      device=device, haystack=haystack)
    _save(out, "lfps_recall", rows, ["context", "budget", "block_size", "expand", "R", *METRICS])


@main.command("index")
@click.option("--contexts", default="32k,64k,128k", show_default=True)
@click.option("--budget", default=4096, show_default=True)
@click.option("--repeats", default=20, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/lfps"), show_default=True)
@click.option("--tiny", is_flag=True, help="CPU only, 8K context")
def index_command(contexts, budget, repeats, out, tiny) -> None:
    rows = []
    sizes = [8192] if tiny else _tokens(contexts)
    if torch.cuda.is_available() and not tiny:
        rows += run_index(sizes, "cuda", budget, repeats=repeats)
    with torch_threads(1):  # the paper's baseline: one CPU core
        rows += run_index(sizes, "cpu", budget if not tiny else 512, repeats=3 if tiny else max(3, repeats // 4))
    _save(out, "lfps_index", rows, ["device", "context", "candidate_tokens", "candidate_fraction", "case", "ms", "ratio"])


@main.command("offload")
@click.option("--model", default="random:llama-3.1-8b", show_default=True)
@click.option("--context", default="512k", show_default=True)
@click.option("--steps", default=32, show_default=True,
              help="timed decode steps after 2 untimed ones (refresh every 16: steps 16 and 32 are timed)")
@click.option("--fill", type=click.Choice(["random", "prefill"]), default="random", show_default=True)
@click.option("--attend", default="selected", show_default=True)
@click.option("--index", "index_side", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--prefetch/--no-prefetch", default=True, show_default=True,
              help="copy the next layer's candidate blocks while this layer computes (with --attend "
                   "candidates; attend=selected never prefetches)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/lfps"), show_default=True)
@click.option("--tiny", is_flag=True, help="random:tiny-llama on CPU, 2K context")
def offload_command(model, context, steps, fill, attend, index_side, prefetch, out, tiny) -> None:
    shape = "tiny-llama" if tiny else "llama-3.1-8b"
    gpu = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else 80 * 2**30
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    contexts = [n << 10 for n in (128, 256, 384, 512, 640, 768, 1024)]
    _save(out, "offload_fit", fit_table(shape, contexts, gpu, host))
    device = "cpu" if tiny else None
    model, context = ("random:tiny-llama", 2048) if tiny else (model, _tokens(context)[0])
    options = dict(attend=attend, budget=256 if tiny else 4096)
    config = OffloadConfig(index=index_side, prefetch=prefetch)
    _save(out, "offload_run", run_offload(model, context, steps, device, options, config, fill))


@main.command("check")
@click.option("--model", default="random:llama-3.1-8b", show_default=True)
@click.option("--context", default="16k", show_default=True)
@click.option("--steps", default=24, show_default=True)
@click.option("--attend", default="selected", show_default=True)
@click.option("--index", "index_side", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/lfps"), show_default=True)
@click.option("--tiny", is_flag=True, help="random:tiny-llama on CPU, 1K context")
def check_command(model, context, steps, attend, index_side, out, tiny) -> None:
    device = "cpu" if tiny else None
    model, context = ("random:tiny-llama", 1024) if tiny else (model, _tokens(context)[0])
    options = dict(attend=attend, budget=128 if tiny else 2048, refresh_every=4)
    rows = run_check(model, context, steps, device, options, OffloadConfig(index=index_side))
    _save(out, "lfps_check", rows, ["check", "passed", "same_tokens", "identical_outputs", "max_rel_err"])


if __name__ == "__main__":
    main()
