"""Quest: per-page min/max keys bound each page's attention score; attend to the top pages.

Page score (per query head) = sum over channels of max(q * k_min, q * k_max), computed as two matrix
products: relu(q) @ k_max + min(q, 0) @ k_min (`kernels.quest_page_scores`, which also folds the new
key into its page's bounds). Pages are units of `page_size` tokens of the same cache.
"""
from __future__ import annotations

import torch

from ..core import DecodeBatch, KVPool
from ..kernels import quest_page_scores
from .base import DecodeMethod
from ..core.selection import BlockSelector

BOUNDS_CHUNK_BLOCKS = 256  # blocks whose page bounds after_prefill computes at a time (one layer's K copied)


class Quest(DecodeMethod):
    name = "quest"
    defaults = dict(budget=4096, page_size=16, dense_layers=2, aggregate="max")

    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        o = self.options
        # Quest keeps no sink; the page being written is always attended.
        self.selector = BlockSelector("tokens", o["budget"], o["page_size"], sink_blocks=0, local_blocks=1)

    def block_state_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        c = self.config  # min and max keys per page
        heads = len(self.kv_heads)
        return 2 * c.num_layers * heads * (block_size // self.options["page_size"]) * c.head_dim * dtype.itemsize

    def plan(self, pool: KVPool, max_seqs: int, max_blocks: int) -> None:
        page = self.options["page_size"]
        if pool.block_size % page:
            raise ValueError(f"quest page_size {page} must divide the engine's block_size {pool.block_size}")
        # Page bounds live with the pool's blocks (a shared prefix block shares its bounds).
        shape = (pool.num_layers, pool.num_blocks, pool.num_kv_heads, pool.block_size // page, pool.head_dim)
        self.k_min = torch.zeros(shape, dtype=pool.dtype, device=pool.device)
        self.k_max = torch.zeros(shape, dtype=pool.dtype, device=pool.device)
        rows = (max_seqs, pool.num_kv_heads)
        capacity = max_blocks * pool.block_size
        self.pages = torch.zeros(*rows, self.selector.list_length(capacity), dtype=torch.int32, device=pool.device)
        self.counts = torch.zeros(rows, dtype=torch.int32, device=pool.device)
        self.all_rows = torch.ones(rows, dtype=torch.bool, device=pool.device)
        self.scores = torch.empty(*rows, capacity // page, dtype=torch.float32, device=pool.device)

    def after_prefill(self, layer: int, pool: KVPool, blocks: torch.Tensor, length: int,
                      queries: torch.Tensor | None = None) -> None:
        page, block_size = self.options["page_size"], pool.block_size
        held = blocks[: -(-length // block_size)]
        for lo in range(0, len(held), BOUNDS_CHUNK_BLOCKS):  # a bounded transient, whatever the length
            part = held[lo:lo + BOUNDS_CHUNK_BLOCKS]
            k = pool.k[layer, part].unflatten(2, (-1, page))  # [blocks, Hkv, pages, page, D]
            positions = torch.arange(lo * block_size, (lo + len(part)) * block_size, device=pool.device)
            filled = positions.view(len(part), 1, -1, page, 1) < length
            # Empty pages get 0 rather than +-inf, so page scores stay finite; the selector never picks them.
            k_min = k.masked_fill(~filled, float("inf")).amin(dim=3)
            k_max = k.masked_fill(~filled, float("-inf")).amax(dim=3)
            self.k_min[layer, part] = k_min.masked_fill(k_min.isinf(), 0)
            self.k_max[layer, part] = k_max.masked_fill(k_max.isinf(), 0)

    def attend(self, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        if layer < self.options["dense_layers"]:  # these layers never select: no page bounds to keep
            return pool.attention(layer, q, batch, self.scale)[0]
        size, page = batch.size, self.options["page_size"]
        # Fold the new key into its page's bounds, then score every page (one launch on CUDA).
        scores = quest_page_scores(q, pool.k[layer], self.k_min[layer], self.k_max[layer], batch.seq_lens, page,
                                   self.options["aggregate"], self.scores[:size], block_tables=batch.block_tables)
        pages, counts = self.pages[:size], self.counts[:size]
        # One launch on CUDA (the selection kernel over the scores), the PyTorch path elsewhere.
        self.selector.select_into(pages, counts, self.all_rows[:size], batch.seq_lens, scores)
        return pool.attention(layer, q, batch, self.scale, page, pages, counts, sorted_lists=True)[0]

    def kv_tokens_read(self, seq_len: int, step: int) -> float:
        c = self.config
        dense = min(self.options["dense_layers"], c.num_layers)
        pages = -(-seq_len // self.options["page_size"])  # min + max keys: one K/V row's worth per page
        sparse = min(seq_len, self.selector.tokens_kept(seq_len)) + pages
        return float(c.num_kv_heads * (dense * seq_len + (c.num_layers - dense) * sparse))
