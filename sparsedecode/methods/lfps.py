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
buffers for CUDA graphs; a refresh threshold adds a few elementwise ops. The top-k and the next layer's
candidates run on a side stream (`lychee.SelectionStream`), overlapping the rest of the layer. Elsewhere
their PyTorch references run.

Refresh: a sequence's decode step 0 and every `refresh_every`-th step after it make its rows full (exact
top-k over all blocks); each sequence counts its own steps, on the device (`DecodeBatch.steps`).
With `refresh_threshold` f, a row whose candidate score mass (sum of exp of the scaled scores, mean in
the log domain over the group's query heads) falls below f times the full mass of its last exact step
becomes full on the next step: a per-row flag tensor feeds the op's `full_rows`, so the decision stays
on the device and inside the captured graph; the forced rows are counted there too, and the generation's
KV accounting adds their reads once at its end (`extra_kv_tokens_read`).

Output (`attend`): "candidates" (default) returns the output of the scoring pass, over the candidates,
a superset of the kept top-k; refresh steps are then dense. "selected" adds a second pass over the new
top-k only, refresh steps included (their output is over the exact top-k). "candidates" is closer to
dense (docs/methods.md) and, on the GPU, reads less (one pass). "selected" is for KV offload, where the
scoring runs over keys the GPU may not hold and the GPU needs only the top-k blocks.

`lychee+lfps`: LycheeDecode whose retrieval heads run LFPS between exact refreshes instead of scanning
everything; sparse heads still attend to the blocks handed on by the nearest earlier retrieval head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core import DecodeBatch, KVPool
from ..kernels import lfps_candidates_into
from .base import DecodeMethod
from .lychee import Lychee, SelectionStream
from ..core.selection import BlockSelector

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
    """The LFPS state of every decode slot and its rules: per (layer, slot, KV head) the last selection,
    the refresh flag and the log-mass of the last exact step. Fixed shapes, on the pool's device."""

    def __init__(self, selector: BlockSelector, expand: int, aggregate: str, refresh_every: int,
                 refresh_threshold: float | None) -> None:
        if aggregate not in ("max", "sum"):
            raise ValueError(f"aggregate must be 'max' or 'sum', not {aggregate!r}")
        self.selector = selector
        self.offsets = candidate_offsets(expand)
        self.aggregate = aggregate
        self.refresh_every = refresh_every
        self.log_threshold = None if refresh_threshold is None else math.log(refresh_threshold)

    def plan(self, pool: KVPool, max_seqs: int, max_blocks: int, num_heads: int,
             unit_lse: torch.Tensor | None = None) -> None:
        layers, heads, device = pool.num_layers, pool.num_kv_heads, pool.device
        capacity = max_blocks * pool.block_size
        self.num_blocks = capacity // self.selector.block_size
        self.list_length = self.selector.list_length(capacity)
        self.blocks = torch.full((layers, max_seqs, heads, self.list_length), self.num_blocks, dtype=torch.int32,
                                 device=device)
        self.counts = torch.zeros(layers, max_seqs, heads, dtype=torch.int32, device=device)
        self.force_full = torch.zeros(layers, max_seqs, heads, dtype=torch.bool, device=device)
        self.exact_lse = torch.full((layers, max_seqs, heads), float("inf"), device=device)
        self.forced_rows = torch.zeros(max_seqs, dtype=torch.int64, device=device)  # threshold-forced full rows
        self.refresh_rows = torch.zeros(max_seqs, heads, dtype=torch.bool, device=device)  # this step's
        self.all_rows = torch.ones(max_seqs, heads, dtype=torch.bool, device=device)
        self.offset_tensor = torch.tensor(self.offsets, device=device)
        self.use_kernel = self.uses_kernel(device)
        if self.use_kernel:  # the candidate kernel's output and scratch: fixed addresses for CUDA graphs
            self.candidate_lists = torch.full((max_seqs, heads, self.width), self.num_blocks, dtype=torch.int32,
                                              device=device)
            self.candidate_counts = torch.zeros(max_seqs, heads, dtype=torch.int32, device=device)
            self.bitmap = torch.zeros(max_seqs, heads, self.num_blocks, dtype=torch.int8, device=device)
        if unit_lse is None:
            unit_lse = torch.empty(max_seqs, num_heads, self.num_blocks, dtype=torch.float32, device=device)
        self.unit_lse = unit_lse

    def reset_slot(self, slot: int) -> None:
        self.blocks[:, slot] = self.num_blocks
        self.counts[:, slot] = 0
        self.force_full[:, slot] = False
        self.exact_lse[:, slot] = float("inf")
        self.forced_rows[slot] = 0

    @property
    def width(self) -> int:
        """Length of a candidate list."""
        return self.list_length * len(self.offsets) + self.selector.sink_blocks + self.selector.local_blocks

    @staticmethod
    def uses_kernel(device: torch.device) -> bool:
        """Whether `candidates` runs the one-launch Triton kernel (CUDA) instead of the PyTorch reference."""
        return torch.device(device).type == "cuda"

    def refresh_step(self, step: int | torch.Tensor) -> bool | torch.Tensor:
        """Whether decode step `step` of a sequence is an exact refresh."""
        return step % self.refresh_every == 0

    def begin_step(self, batch: DecodeBatch) -> None:
        rows = self.refresh_rows[: batch.size]
        rows.copy_(self.refresh_step(batch.steps)[:, None].expand_as(rows))

    def candidates(self, layer: int, seq_lens: torch.Tensor, rows: torch.Tensor | None = None,
                   handed_blocks: torch.Tensor | None = None,
                   handed_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s candidate lists [B, H, width] and counts [B, H]; with `rows` and a handed
        selection, the rows outside `rows` get the handed list (see `lfps_candidates`). On CUDA one
        launch into the planned buffers (the next call overwrites them)."""
        s, size = self.selector, seq_lens.shape[0]
        args = (self.blocks[layer, :size], self.counts[layer, :size], seq_lens, s.block_size, self.offset_tensor,
                s.sink_blocks, s.local_blocks, self.num_blocks, rows, handed_blocks, handed_counts)
        if not self.use_kernel:
            return lfps_candidates(*args)
        lists, counts = self.candidate_lists[:size], self.candidate_counts[:size]
        lfps_candidates_into(*args, out_blocks=lists, out_counts=counts, bitmap=self.bitmap[:size])
        return lists, counts

    def full_rows(self, layer: int, size: int) -> torch.Tensor:
        """This step's full rows of `layer`: the refreshing sequences', and the threshold's (without a
        threshold the refresh flags themselves: no launch per layer)."""
        if self.log_threshold is None:
            return self.refresh_rows[:size]
        return self.refresh_rows[:size] | self.force_full[layer, :size]

    def count_forced_rows(self, layer: int, size: int) -> None:
        """Count (on the device) the rows the threshold makes full outside a refresh, for the KV accounting."""
        if self.log_threshold is not None:
            self.forced_rows[:size] += (self.force_full[layer, :size] & ~self.refresh_rows[:size]).sum(-1)

    def extra_tokens_read(self, slot: int, mean_seq_len: float) -> float:
        """Tokens the threshold-forced full rows of `slot` read beyond their candidate lists since its reset
        (see `DecodeMethod.extra_kv_tokens_read`)."""
        if self.log_threshold is None:
            return 0.0
        rows = int(self.forced_rows[slot])
        return rows * max(0.0, mean_seq_len - self.candidate_tokens(round(mean_seq_len)))

    def update(self, layer: int, lse: torch.Tensor, seq_lens: torch.Tensor, full: torch.Tensor,
               rows: torch.Tensor | None = None,
               copy_to: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Keep the top-k of the pass's scored blocks (`unit_lse`, `lse` [B, Hq]) as the new selection
        of `rows` (all when None), also written into `copy_to` (blocks, counts) when given, and set the
        refresh flags."""
        size = seq_lens.shape[0]
        self.selector.select_into(self.blocks[layer, :size], self.counts[layer, :size],
                                  self.all_rows[:size] if rows is None else rows, seq_lens,
                                  unit_lse=self.unit_lse[:size], lse=lse, aggregate=self.aggregate, copy_to=copy_to)
        if self.log_threshold is not None:
            heads = self.blocks.shape[2]
            row_lse = lse.view(size, heads, -1).mean(-1)
            exact = self.exact_lse[layer, :size]
            exact.copy_(torch.where(full, row_lse, exact))
            collapsed = ~full & (row_lse < exact + self.log_threshold)
            self.force_full[layer, :size].copy_(collapsed if rows is None else collapsed & rows)

    def candidate_tokens(self, seq_len: int) -> int:
        """Tokens of a candidate list at `seq_len` at most (analytic, for the KV bytes accounting)."""
        s = self.selector
        held = -(-seq_len // s.block_size)
        kept = -(-s.tokens_kept(seq_len) // s.block_size)  # blocks, the newest partly filled
        return min(held, kept * len(self.offsets) + s.sink_blocks + s.local_blocks) * s.block_size


class LFPS(DecodeMethod):
    name = "lfps"
    supports_kv_offload = True
    defaults = dict(
        budget=4096,  # tokens kept per (layer, KV head): the top-k
        block_size=64,
        refresh_every=16,  # R: an exact (full-row) step every R steps of a sequence, its first included
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
        self.past = PastSelection(self.selector, o["expand"], o["aggregate"], o["refresh_every"],
                                  o["refresh_threshold"])

    def plan(self, pool: KVPool, max_seqs: int, max_blocks: int) -> None:
        self.past.plan(pool, max_seqs, max_blocks, pool.num_kv_heads * self.config.group_size)
        pool.reserve(self.past.width + 1)
        self.selection = SelectionStream(pool)
        self.ahead: tuple | None = None  # (layer, lists, counts) computed on the side stream

    def reset_slot(self, slot: int) -> None:
        self.past.reset_slot(slot)

    def begin_step(self, batch: DecodeBatch) -> None:
        self.past.begin_step(batch)

    def extra_kv_tokens_read(self, slot: int, mean_seq_len: float) -> float:
        return self.past.extra_tokens_read(slot, mean_seq_len)

    def attend(self, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        past, block_size, size, seq_lens = self.past, self.options["block_size"], batch.size, batch.seq_lens
        self.selection.join()  # the previous layer's top-k reads the block scores overwritten below
        full = past.full_rows(layer, size)
        past.count_forced_rows(layer, size)
        ahead, self.ahead = self.ahead, None
        lists, counts = ahead[1:] if ahead and ahead[0] == layer else past.candidates(layer, seq_lens)
        unit_lse = past.unit_lse[:size]
        if self.options["attend"] == "candidates":
            out, lse = pool.attention(layer, q, batch, self.scale, block_size, lists, counts, full, unit_lse,
                                      sorted_lists=True)
            last = layer + 1 == pool.num_layers

            def select() -> None:
                past.update(layer, lse, seq_lens, full)
                if self.selection.overlaps and not last:
                    self.ahead = (layer + 1, *past.candidates(layer + 1, seq_lens))

            self.selection.run(select, lse, full)
            if last:
                self.selection.join()
            if pool.prefetches and layer + 1 < pool.num_layers:
                pool.prefetch(layer + 1, batch, *past.candidates(layer + 1, seq_lens))
            return out
        lse = pool.index(layer, q, batch, self.scale, block_size, lists, counts, full, unit_lse)
        past.update(layer, lse, seq_lens, full)
        # A pool in host memory needs only this top-k, which the index finds: prefetching the candidates
        # (3x the blocks) was slower (docs/notes, KV offload).
        return pool.attention(layer, q, batch, self.scale, block_size, past.blocks[layer, :size],
                              past.counts[layer, :size], sorted_lists=True)[0]

    def kv_tokens_read(self, seq_len: int, step: int) -> float:
        rows = self.config.num_layers * self.config.num_kv_heads
        scored = seq_len if self.past.refresh_step(step) else min(seq_len, self.past.candidate_tokens(seq_len))
        if self.options["attend"] == "candidates":
            return float(rows * scored)
        return float(rows * (scored + min(seq_len, self.selector.tokens_kept(seq_len))))


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
        self.past = PastSelection(self.selector, o["expand"], o["aggregate"], o["refresh_every"],
                                  o["refresh_threshold"])

    def plan(self, pool: KVPool, max_seqs: int, max_blocks: int) -> None:
        super().plan(pool, max_seqs, max_blocks)
        self.past.plan(pool, max_seqs, max_blocks, pool.num_kv_heads * self.config.group_size, self.unit_lse)
        pool.reserve(self.past.width + 1)
        self.ahead: tuple | None = None  # (layer, lists, counts) computed on the side stream

    def reset_slot(self, slot: int) -> None:
        super().reset_slot(slot)
        self.past.reset_slot(slot)

    def begin_step(self, batch: DecodeBatch) -> None:
        # Not LycheeDecode's: every layer's full rows of the step at once, in up to three launches per step
        # instead of three per layer: retrieval rows of refreshing sequences, rows the threshold collapsed
        # (retrieval rows, set by the previous step's `update` of the layer), and every row of a sequence
        # taking a dense correction step.
        self.past.begin_step(batch)
        full = self.full_rows[:, : batch.size]
        torch.logical_and(self.retrieval_rows[:, : batch.size], self.past.refresh_rows[None, : batch.size], out=full)
        if self.past.log_threshold is not None:
            full |= self.past.force_full[:, : batch.size]
        if self.options["dense_every"]:
            full |= self.dense_step(batch.steps)[None, :, None]

    def extra_kv_tokens_read(self, slot: int, mean_seq_len: float) -> float:
        return self.past.extra_tokens_read(slot, mean_seq_len)

    def row_lists(self, layer: int, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval rows: their candidates; sparse rows: the handed blocks, padded to the same width."""
        size = seq_lens.shape[0]
        return self.past.candidates(layer, seq_lens, self.retrieval_rows[layer, :size], self.blocks[:size],
                                    self.counts[:size])

    def attend(self, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        size, seq_lens = batch.size, batch.seq_lens
        self.selection.join()  # the previous layer's selection: its handed blocks are read, its scores overwritten
        retrieval = self.retrieval_rows[layer, :size]
        full = self.full_rows[layer, :size]  # see begin_step
        self.past.count_forced_rows(layer, size)
        ahead, self.ahead = self.ahead, None
        lists, counts = ahead[1:] if ahead and ahead[0] == layer else self.row_lists(layer, seq_lens)
        unit_lse = self.past.unit_lse[:size]
        out, lse = pool.attention(layer, q, batch, self.scale, self.options["block_size"], lists, counts, full,
                                  unit_lse, sorted_lists=True, scored_rows=self.scored_rows(layer, size))
        # The retrieval rows' own selection and the blocks handed to later layers come from the same scores,
        # rows and selector: one selection writes both (unless the heads share one, TidalDecode-style).
        hands_on = self.selects[layer]
        shared = self.options["share_heads"]
        last = layer + 1 == pool.num_layers

        def select() -> None:
            self.past.update(layer, lse, seq_lens, full, rows=retrieval,
                             copy_to=(self.blocks[:size], self.counts[:size]) if hands_on and not shared else None)
            if hands_on and shared:
                self.hand_on(layer, unit_lse, seq_lens, lse=lse)
            if self.selection.overlaps and not last:  # the next layer's lists, off the decode stream too
                self.ahead = (layer + 1, *self.row_lists(layer + 1, seq_lens))

        self.selection.run(select, lse)  # overlaps the projections up to the next layer's attend
        if last:
            self.selection.join()
        if pool.prefetches and layer + 1 < pool.num_layers:
            pool.prefetch(layer + 1, batch, *self.row_lists(layer + 1, seq_lens))
        return out

    def kv_tokens_read(self, seq_len: int, step: int) -> float:
        if self.dense_step(step) or self.past.refresh_step(step):  # the retrieval rows are full as in LycheeDecode
            return super().kv_tokens_read(seq_len, step)
        retrieval = self.num_retrieval_units()
        sparse = self.roles.retrieval.numel() - retrieval
        candidates = min(seq_len, self.past.candidate_tokens(seq_len))
        return float(retrieval * candidates + sparse * min(seq_len, self.selector.tokens_kept(seq_len)))
