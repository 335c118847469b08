"""Dense decode attention: every cached token of every head. The baseline."""
from __future__ import annotations

import torch

from ..core import DecodeBatch, KVPool
from .base import DecodeMethod


class Dense(DecodeMethod):
    name = "dense"

    def attend(self, layer: int, q: torch.Tensor, pool: KVPool, batch: DecodeBatch) -> torch.Tensor:
        return pool.attention(layer, q, batch, self.scale)[0]

    def kv_tokens_read(self, seq_len: int, step: int) -> float:
        return self.dense_tokens_read(seq_len)
