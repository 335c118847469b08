"""Streaming attention (the DuoAttention streaming head, StreamingLLM): sink blocks plus a recent window."""
from __future__ import annotations

import torch

from ..engine.kv_cache import KVCache
from ..kernels import sparse_decode_attention
from .base import DecodeMethod, register
from .selection import BlockSelector


@register
class Streaming(DecodeMethod):
    name = "streaming"
    defaults = dict(budget=4096, block_size=64, sink_blocks=1)

    def __init__(self, config, **options) -> None:
        super().__init__(config, **options)
        o = self.options
        window = o["budget"] // o["block_size"] - o["sink_blocks"]
        if window < 1:
            raise ValueError(f"budget {o['budget']} leaves no recent window after {o['sink_blocks']} sink block(s)")
        self.selector = BlockSelector("tokens", o["budget"], o["block_size"], o["sink_blocks"], window)

    def plan(self, cache: KVCache) -> None:
        self.list_length = self.selector.list_length(cache.capacity)
        self.no_scores = torch.zeros(
            cache.batch_size, cache.num_kv_heads, cache.capacity // self.options["block_size"], device=cache.device
        )

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor) -> torch.Tensor:
        if layer == 0:  # every layer reads the same window
            self.blocks, self.counts = self.selector.select(self.no_scores, seq_lens, self.list_length)
        return sparse_decode_attention(
            q, cache.k[layer], cache.v[layer], seq_lens, self.scale, self.options["block_size"], self.blocks, self.counts,
            sorted_lists=True,
        )[0]

    def kv_tokens_read(self, seq_len: int, variant: str) -> float:
        c = self.config
        return float(c.num_layers * c.num_kv_heads * min(seq_len, self.selector.tokens_kept(seq_len)))
