"""LFPS, learn from the past: each head predicts its top-k blocks from its own previous selection.

Per (layer, sequence, KV head) the last selection I(t-1) gives step t's candidates: vertical (the same
blocks), slash (the blocks one further on: keys at a fixed distance behind the new token move forward
with the step, and cross at most one block boundary between refreshes of <= block_size steps),
positional expansion (neighbours within `expand` blocks), the sink blocks and the local window. Only
the candidates are scored, exactly: the op visits them as a list row and emits their per-block
log-sum-exp in the same pass as the attention output. Their top-k is I(t).

On CUDA a layer's bookkeeping besides the attention op is one Triton launch for the candidate lists
(`kernels.lfps_candidates_into`, which also fills in the handed lists of lychee+lfps's sparse rows) and
one per top-k (`kernels.select_blocks`: the new selection, and lychee+lfps's hand-on), into fixed
buffers for CUDA graphs; a refresh threshold adds a few elementwise ops. Elsewhere their PyTorch
references run.

Refresh: step 0 and every `refresh_every`-th step make every row full (exact top-k over all blocks).
With `refresh_threshold` f, a row whose candidate score mass (sum of exp of the scaled scores, mean in
the log domain over the group's query heads) falls below f times the full mass of its last exact step
becomes full on the next step: a per-row flag tensor feeds the op's `full_rows`, so the decision stays
on the device and inside the captured graph; the forced rows are counted there too, and the generation's
KV accounting adds their reads once at its end (`extra_kv_tokens_read`).

Output (`attend`): "candidates" (default) returns the output of the scoring pass, over the candidates,
a superset of the kept top-k; refresh steps are then dense. "selected" adds a second pass over the new
top-k only, refresh steps included (their output is over the exact top-k). Measured (lfps_bench recall on
CPU, qwen2.5-coder-1.5b at 8K and smollm2-135m at 4K, budget 2-5%, blocks of 64, expand 1): "candidates"
is closer to dense (relative output error 0.19-0.25 against 0.33) and, on the GPU, reads less (one
pass). "selected" is for KV offload, where the scoring runs on the CPU over host keys and the GPU needs
only the top-k blocks. Same runs: block recall of the exact top-k 0.93-0.95 for R = 4..32 with the
candidates 4-8% of the context; blocks of 16 recall 0.78-0.85 (but hold more of the top tokens).

`lychee+lfps`: LycheeDecode whose retrieval heads run LFPS between exact refreshes instead of scanning
everything; sparse heads still attend to the blocks handed on by the nearest earlier retrieval head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..engine.kv_cache import KVCache
from ..kernels import lfps_candidates_into
from ..offload import OffloadedKVCache, cache_attention, cache_index, reserve_pool
from .base import DecodeMethod, register
from .lychee import Lychee
from .selection import BlockSelector

ATTEND_MODES = ("candidates", "selected")


def candidate_offsets(expand: int) -> list[int]:
    """Block shifts applied to the previous selection: 0 (vertical), +1 (slash), +-1..expand."""
    return sorted(set(range(-expand, expand + 1)) | {0, 1})


def lfps_candidates(
    blocks: torch.Tensor,
    counts: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    offsets: torch.Tensor,
    sink_blocks: int,
    local_blocks: int,
    num_blocks: int,
    rows: torch.Tensor | None = None,
    handed_blocks: torch.Tensor | None = None,
    handed_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate blocks of every row, with fixed shapes and no host synchronisation (the PyTorch
    reference of `kernels.lfps_candidates_into`).

    blocks: [B, H, K] int32 previous selection (first `counts` entries valid); offsets: [O] int64.
    Returns (candidates [B, H, K * O + sink_blocks + local_blocks] int32 ascending, unique, padded
    with `num_blocks`; counts [B, H] int32). With `rows` [B, H] bool, `handed_blocks` [B, H, KH] and
    `handed_counts` [B, H]: rows where `rows` is False get the handed list (padded with `num_blocks`)
    and count instead.
    """
    batch, heads, _ = blocks.shape
    device = blocks.device
    held = (-(-seq_lens.long() // block_size)).view(batch, 1, 1)  # blocks holding tokens
    kept = torch.arange(blocks.shape[-1], device=device) < counts[..., None]
    shifted = blocks.long()[..., None] + offsets
    shifted = torch.where(kept[..., None], shifted, -1).flatten(2)
    sink = torch.arange(sink_blocks, device=device).expand(batch, heads, -1)
    local = (held - local_blocks + torch.arange(local_blocks, device=device)).expand(-1, heads, -1)
    raw = torch.cat([shifted, sink, local], dim=-1)
    raw = torch.where((raw >= 0) & (raw < held), raw, num_blocks).sort(dim=-1).values
    # Duplicates sit side by side once sorted: drop all but the first, then sort the gaps to the end.
    repeated = F.pad(raw[..., 1:] == raw[..., :-1], (1, 0))
    unique = torch.where(repeated, num_blocks, raw).sort(dim=-1).values.to(torch.int32)
    unique_counts = (unique < num_blocks).sum(-1, dtype=torch.int32)
    if rows is None:
        return unique, unique_counts
    handed = F.pad(handed_blocks, (0, unique.shape[-1] - handed_blocks.shape[-1]), value=num_blocks)
    return torch.where(rows[..., None], unique, handed), torch.where(rows, unique_counts, handed_counts)


def check_lfps_options(refresh_every: int, expand: int, refresh_threshold: float | None) -> None:
    if not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"refresh_every must be an integer >= 1, not {refresh_every!r}")
    if not isinstance(expand, int) or expand < 0:
        raise ValueError(f"expand must be an integer >= 0, not {expand!r}")
    if refresh_threshold is not None and not 0 < refresh_threshold < 1:
        raise ValueError(f"refresh_threshold must be in (0, 1) or None, not {refresh_threshold!r}")


class PastSelection:
    """The LFPS state of one cache and its rules: per (layer, sequence, KV head) the last selection,
    the refresh flag and the log-mass of the last exact step. Fixed shapes, on the cache's device."""

    def __init__(self, selector: BlockSelector, expand: int, aggregate: str, refresh_threshold: float | None) -> None:
        if aggregate not in ("max", "sum"):
            raise ValueError(f"aggregate must be 'max' or 'sum', not {aggregate!r}")
        self.selector = selector
        self.offsets = candidate_offsets(expand)
        self.aggregate = aggregate
        self.log_threshold = None if refresh_threshold is None else math.log(refresh_threshold)

    def plan(self, cache: KVCache, num_heads: int, unit_lse: torch.Tensor | None = None) -> None:
        layers, batch, heads, device = cache.num_layers, cache.batch_size, cache.num_kv_heads, cache.device
        self.num_blocks = cache.capacity // self.selector.block_size
        self.list_length = self.selector.list_length(cache.capacity)
        shape = (layers, batch, heads, self.list_length)
        self.blocks = torch.full(shape, self.num_blocks, dtype=torch.int32, device=device)
        self.counts = torch.zeros(layers, batch, heads, dtype=torch.int32, device=device)
        self.force_full = torch.zeros(layers, batch, heads, dtype=torch.bool, device=device)
        self.exact_lse = torch.full((layers, batch, heads), float("inf"), device=device)
        self.forced_rows = torch.zeros(batch, dtype=torch.int64, device=device)  # threshold-forced full rows
        self.all_rows = torch.ones(batch, heads, dtype=torch.bool, device=device)
        self.offset_tensor = torch.tensor(self.offsets, device=device)
        self.use_kernel = self.uses_kernel(device)
        if self.use_kernel:  # the candidate kernel's output and scratch: fixed addresses for CUDA graphs
            self.candidate_lists = torch.full((batch, heads, self.width), self.num_blocks, dtype=torch.int32,
                                              device=device)
            self.candidate_counts = torch.zeros(batch, heads, dtype=torch.int32, device=device)
            self.bitmap = torch.zeros(batch, heads, self.num_blocks, dtype=torch.int8, device=device)
        if unit_lse is None:
            unit_lse = torch.empty(batch, num_heads, self.num_blocks, dtype=torch.float32, device=device)
        self.unit_lse = unit_lse

    @property
    def width(self) -> int:
        """Length of a candidate list."""
        return self.list_length * len(self.offsets) + self.selector.sink_blocks + self.selector.local_blocks

    @staticmethod
    def uses_kernel(device: torch.device) -> bool:
        """Whether `candidates` runs the one-launch Triton kernel (CUDA) instead of the PyTorch reference."""
        return torch.device(device).type == "cuda"

    def candidates(self, layer: int, seq_lens: torch.Tensor, rows: torch.Tensor | None = None,
                   handed_blocks: torch.Tensor | None = None,
                   handed_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s candidate lists [B, H, width] and counts [B, H]; with `rows` and a handed
        selection, the rows outside `rows` get the handed list (see `lfps_candidates`). On CUDA one
        launch into the planned buffers (the next call overwrites them)."""
        s = self.selector
        args = (self.blocks[layer], self.counts[layer], seq_lens, s.block_size, self.offset_tensor, s.sink_blocks,
                s.local_blocks, self.num_blocks, rows, handed_blocks, handed_counts)
        if not self.use_kernel:
            return lfps_candidates(*args)
        lfps_candidates_into(*args, out_blocks=self.candidate_lists, out_counts=self.candidate_counts,
                             bitmap=self.bitmap)
        return self.candidate_lists, self.candidate_counts

    def full_rows(self, layer: int, refresh: bool) -> torch.Tensor:
        """This step's full rows of `layer`; between refreshes the threshold's, which are also counted
        (on the device) for the KV accounting."""
        if refresh:
            return self.all_rows
        if self.log_threshold is not None:
            self.forced_rows += self.force_full[layer].sum(-1)
        return self.force_full[layer]

    def extra_tokens_read(self, mean_seq_lens: list[float]) -> list[float]:
        """Tokens the threshold-forced full rows read beyond their candidate lists, per sequence since
        `reset_count` (see `DecodeMethod.extra_kv_tokens_read`)."""
        return [rows * max(0.0, length - self.candidate_tokens(round(length)))
                for rows, length in zip(self.forced_rows.tolist(), mean_seq_lens, strict=True)]

    def reset_count(self, batch_index: int) -> None:
        self.forced_rows[batch_index] = 0

    def update(self, layer: int, lse: torch.Tensor, seq_lens: torch.Tensor, full: torch.Tensor,
               rows: torch.Tensor | None = None,
               copy_to: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Keep the top-k of the pass's scored blocks (`unit_lse`, `lse` [B, Hq]) as the new selection
        of `rows` (all when None), also written into `copy_to` (blocks, counts) when given, and set the
        refresh flags."""
        self.selector.select_into(self.blocks[layer], self.counts[layer], self.all_rows if rows is None else rows,
                                  seq_lens, unit_lse=self.unit_lse, lse=lse, aggregate=self.aggregate,
                                  copy_to=copy_to)
        if self.log_threshold is not None:
            heads = self.blocks.shape[2]
            row_lse = lse.view(lse.shape[0], heads, -1).mean(-1)
            exact = self.exact_lse[layer]
            exact.copy_(torch.where(full, row_lse, exact))
            collapsed = ~full & (row_lse < exact + self.log_threshold)
            self.force_full[layer].copy_(collapsed if rows is None else collapsed & rows)

    def candidate_tokens(self, seq_len: int) -> int:
        """Tokens of a candidate list at `seq_len` at most (analytic, for the KV bytes accounting)."""
        s = self.selector
        held = -(-seq_len // s.block_size)
        kept = s.tokens_kept(seq_len) // s.block_size
        return min(held, kept * len(self.offsets) + s.sink_blocks + s.local_blocks) * s.block_size


@register
class LFPS(DecodeMethod):
    name = "lfps"
    supports_kv_offload = True
    defaults = dict(
        budget=4096,  # tokens kept per (layer, KV head): the top-k
        block_size=64,
        refresh_every=16,  # R: an exact (full-row) step every R steps, the first included
        expand=1,  # neighbour blocks on each side of a selected block
        sink_blocks=1,
        local_blocks=1,
        aggregate="max",  # block score over the group's query heads: "max" or "sum"
        refresh_threshold=None,  # f in (0, 1): full next step when the candidate mass < f x the exact mass
        attend="candidates",  # output over the scored candidates, or "selected": a second pass over the top-k
    )

    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        o = self.options
        if o["block_size"] not in (16, 32, 64, 128):
            raise ValueError(f"block_size must be 16, 32, 64 or 128, not {o['block_size']}")
        if o["attend"] not in ATTEND_MODES:
            raise ValueError(f"attend must be one of {ATTEND_MODES}, not {o['attend']!r}")
        check_lfps_options(o["refresh_every"], o["expand"], o["refresh_threshold"])
        self.selector = BlockSelector("tokens", o["budget"], o["block_size"], o["sink_blocks"], o["local_blocks"])
        self.past = PastSelection(self.selector, o["expand"], o["aggregate"], o["refresh_threshold"])
        self.variant = "default"

    def plan(self, cache: KVCache) -> None:
        self.past.plan(cache, self.config.num_heads)
        reserve_pool(cache, self.past.width + 1)

    def after_prefill(self, layer: int, cache: KVCache, batch_index: int, length: int) -> None:
        if layer == 0:
            self.past.reset_count(batch_index)

    def step_variant(self, step: int) -> str:
        return "refresh" if step % self.options["refresh_every"] == 0 else "default"

    def extra_kv_tokens_read(self, mean_seq_lens: list[float]) -> list[float]:
        return self.past.extra_tokens_read(mean_seq_lens)

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor) -> torch.Tensor:
        past, block_size = self.past, self.options["block_size"]
        full = past.full_rows(layer, self.variant == "refresh")
        lists, counts = past.candidates(layer, seq_lens)
        if self.options["attend"] == "candidates":
            out, lse = cache_attention(cache, layer, q, seq_lens, self.scale, block_size, lists, counts, full,
                                       past.unit_lse, sorted_lists=True)
            past.update(layer, lse, seq_lens, full)
        else:
            lse = cache_index(cache, layer, q, seq_lens, self.scale, block_size, lists, counts, full, past.unit_lse)
            past.update(layer, lse, seq_lens, full)
            out, _ = cache_attention(cache, layer, q, seq_lens, self.scale, block_size, past.blocks[layer],
                                     past.counts[layer], sorted_lists=True)
            # Offloaded, the pool needs only this top-k, which the index finds: prefetching the candidates
            # (3x the blocks) was slower at 512K on an H100 (docs/results.md, KV offload).
            return out
        if isinstance(cache, OffloadedKVCache) and layer + 1 < cache.num_layers:
            cache.prefetch(layer + 1, seq_lens, *past.candidates(layer + 1, seq_lens))
        return out

    def kv_tokens_read(self, seq_len: int, variant: str) -> float:
        rows = self.config.num_layers * self.config.num_kv_heads
        scored = seq_len if variant == "refresh" else min(seq_len, self.past.candidate_tokens(seq_len))
        if self.options["attend"] == "candidates":
            return float(rows * scored)
        return float(rows * (scored + min(seq_len, self.selector.tokens_kept(seq_len))))


@register
class LycheeLFPS(Lychee):
    """LycheeDecode with LFPS retrieval heads: between exact refreshes a retrieval head attends to and
    scores its own candidates (a list row emitting per-block scores) instead of the whole cache."""

    name = "lychee+lfps"
    supports_kv_offload = True
    defaults = {**Lychee.defaults, "refresh_every": 16, "expand": 1, "refresh_threshold": None}

    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        o = self.options
        if o["budget_mode"] not in ("tokens", "ratio"):
            raise ValueError(
                f"lychee+lfps needs budget_mode 'tokens' or 'ratio' (a bounded top-k), not {o['budget_mode']!r}")
        check_lfps_options(o["refresh_every"], o["expand"], o["refresh_threshold"])
        self.past = PastSelection(self.selector, o["expand"], o["aggregate"], o["refresh_threshold"])

    def plan(self, cache: KVCache) -> None:
        super().plan(cache)
        self.past.plan(cache, self.config.num_heads, self.unit_lse)
        reserve_pool(cache, self.past.width + 1)

    def after_prefill(self, layer: int, cache: KVCache, batch_index: int, length: int) -> None:
        super().after_prefill(layer, cache, batch_index, length)
        if layer == 0:
            self.past.reset_count(batch_index)

    def extra_kv_tokens_read(self, mean_seq_lens: list[float]) -> list[float]:
        return self.past.extra_tokens_read(mean_seq_lens)

    def step_variant(self, step: int) -> str:
        variant = super().step_variant(step)
        return "refresh" if variant == "default" and step % self.options["refresh_every"] == 0 else variant

    def row_lists(self, layer: int, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval rows: their candidates; sparse rows: the handed blocks, padded to the same width."""
        return self.past.candidates(layer, seq_lens, self.full_rows[layer], self.blocks, self.counts)

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor) -> torch.Tensor:
        if self.variant == "dense":
            return cache_attention(cache, layer, q, seq_lens, self.scale)[0]
        retrieval = self.full_rows[layer]
        # Between refreshes only the collapsed rows are full, and those are retrieval rows (`update`).
        full = retrieval if self.variant == "refresh" else self.past.full_rows(layer, False)
        lists, counts = self.row_lists(layer, seq_lens)
        out, lse = cache_attention(cache, layer, q, seq_lens, self.scale, self.options["block_size"], lists, counts,
                                   full, self.past.unit_lse, sorted_lists=True)
        # The retrieval rows' own selection and the blocks handed to later layers come from the same scores,
        # rows and selector: one selection writes both (unless the heads share one, TidalDecode-style).
        hands_on = self.selects[layer]
        shared = self.options["share_heads"]
        self.past.update(layer, lse, seq_lens, full, rows=retrieval,
                         copy_to=(self.blocks, self.counts) if hands_on and not shared else None)
        if hands_on and shared:
            self.hand_on(layer, self.past.unit_lse, seq_lens, lse=lse)
        if isinstance(cache, OffloadedKVCache) and layer + 1 < cache.num_layers:
            cache.prefetch(layer + 1, seq_lens, *self.row_lists(layer + 1, seq_lens))
        return out

    def kv_tokens_read(self, seq_len: int, variant: str) -> float:
        if variant != "default":  # dense, or refresh: the retrieval rows are full as in LycheeDecode
            return super().kv_tokens_read(seq_len, variant)
        retrieval = self.num_retrieval_units()
        sparse = self.roles.retrieval.numel() - retrieval
        candidates = min(seq_len, self.past.candidate_tokens(seq_len))
        return float(retrieval * candidates + sparse * min(seq_len, self.selector.tokens_kept(seq_len)))
