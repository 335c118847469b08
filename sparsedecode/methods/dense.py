"""Dense decode attention: every cached token of every head. The baseline."""
from __future__ import annotations

import torch

from ..engine.kv_cache import KVCache
from ..kernels import sparse_decode_attention
from .base import DecodeMethod, register


@register
class Dense(DecodeMethod):
    name = "dense"

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor) -> torch.Tensor:
        out, _ = sparse_decode_attention(q, cache.k[layer], cache.v[layer], seq_lens, self.scale)
        return out
