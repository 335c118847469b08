"""Quest: per-page min/max keys bound each page's attention score; attend to the top pages.

Page score (per query head) = sum over channels of max(q * k_min, q * k_max), computed as two matrix
products: relu(q) @ k_max + min(q, 0) @ k_min (`kernels.quest_page_scores`, which also folds the new
key into its page's bounds). Pages are units of `page_size` tokens of the same cache.
"""
from __future__ import annotations

import torch

from ..engine.kv_cache import KVCache
from ..kernels import quest_page_scores, sparse_decode_attention
from .base import DecodeMethod, register
from .selection import BlockSelector


@register
class Quest(DecodeMethod):
    name = "quest"
    defaults = dict(budget=4096, page_size=16, dense_layers=2, aggregate="max")

    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        o = self.options
        # Quest keeps no sink; the page being written is always attended.
        self.selector = BlockSelector("tokens", o["budget"], o["page_size"], sink_blocks=0, local_blocks=1)

    def plan(self, cache: KVCache) -> None:
        page = self.options["page_size"]
        shape = (cache.num_layers, cache.batch_size, cache.num_kv_heads, cache.capacity // page, cache.head_dim)
        self.k_min = torch.empty(shape, dtype=cache.k.dtype, device=cache.device)
        self.k_max = torch.empty(shape, dtype=cache.k.dtype, device=cache.device)
        rows = (cache.batch_size, cache.num_kv_heads)
        list_length = self.selector.list_length(cache.capacity)
        self.pages = torch.zeros(*rows, list_length, dtype=torch.int32, device=cache.device)
        self.counts = torch.zeros(rows, dtype=torch.int32, device=cache.device)
        self.all_rows = torch.ones(rows, dtype=torch.bool, device=cache.device)
        self.scores = torch.empty(*rows, cache.capacity // page, dtype=torch.float32, device=cache.device)

    def after_prefill(self, layer: int, cache: KVCache, batch_index: int, length: int) -> None:
        page = self.options["page_size"]
        k = cache.k[layer, batch_index].unflatten(1, (-1, page))  # [Hkv, pages, page, D]
        filled = (torch.arange(cache.capacity, device=cache.device) < length).view(1, -1, page, 1)
        # Empty pages get 0 rather than +-inf, so page scores stay finite; the selector never picks them.
        k_min = k.masked_fill(~filled, float("inf")).amin(dim=2)
        k_max = k.masked_fill(~filled, float("-inf")).amax(dim=2)
        self.k_min[layer, batch_index] = k_min.masked_fill(k_min.isinf(), 0)
        self.k_max[layer, batch_index] = k_max.masked_fill(k_max.isinf(), 0)

    def page_scores(self, layer: int, q: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor) -> torch.Tensor:
        """Fold the new token's key into its page's min/max (a new page starts from that key), then score
        every page: [B, Hkv, pages] float32 (one launch on CUDA)."""
        return quest_page_scores(q, cache.k[layer], self.k_min[layer], self.k_max[layer], seq_lens,
                                 self.options["page_size"], self.options["aggregate"], self.scores)

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor) -> torch.Tensor:
        k, v = cache.k[layer], cache.v[layer]
        if layer < self.options["dense_layers"]:  # these layers never select: no page bounds to keep
            return sparse_decode_attention(q, k, v, seq_lens, self.scale)[0]
        scores = self.page_scores(layer, q, cache, seq_lens)
        # One launch on CUDA (the selection kernel over the scores), the PyTorch path elsewhere.
        self.selector.select_into(self.pages, self.counts, self.all_rows, seq_lens, scores)
        return sparse_decode_attention(q, k, v, seq_lens, self.scale, self.options["page_size"], self.pages,
                                       self.counts, sorted_lists=True)[0]

    def kv_tokens_read(self, seq_len: int, variant: str) -> float:
        c = self.config
        dense = min(self.options["dense_layers"], c.num_layers)
        pages = -(-seq_len // self.options["page_size"])  # min + max keys: one K/V row's worth per page
        sparse = min(seq_len, self.selector.tokens_kept(seq_len)) + pages
        return float(c.num_kv_heads * (dense * seq_len + (c.num_layers - dense) * sparse))
