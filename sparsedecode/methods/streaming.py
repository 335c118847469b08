"""Streaming attention (the DuoAttention streaming head, StreamingLLM): sink blocks plus a recent window."""
from __future__ import annotations

import torch

from ..core import DecodeBatch, KVPool
from .base import DecodeMethod
from ..core.selection import BlockSelector


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

    def plan(self, pool: KVPool, max_seqs: int, max_blocks: int) -> None:
        capacity = max_blocks * pool.block_size
        self.list_length = self.selector.list_length(capacity)
        self.no_scores = torch.zeros(max_seqs, pool.num_kv_heads, capacity // self.options["block_size"],
                                     device=pool.device)

    def begin_step(self, batch: DecodeBatch) -> None:
        # every layer reads the same window
        self.blocks, self.counts = self.selector.select(self.no_scores[: batch.size], batch.seq_lens,
                                                        self.list_length)

    def attend(self, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        return pool.attention(layer, q, batch, self.scale, self.options["block_size"], self.blocks, self.counts,
                              sorted_lists=True)[0]

    def kv_tokens_read(self, seq_len: int, step: int) -> float:
        c = self.config
        return float(c.num_layers * c.num_kv_heads * min(seq_len, self.selector.tokens_kept(seq_len)))
