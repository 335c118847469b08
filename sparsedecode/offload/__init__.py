"""KV cache in host memory for contexts larger than the GPU (`LLM(..., kv_offload="cpu")`).

The cache lives in pinned host memory (the keys on the GPU instead when the index runs there); the GPU
keeps a fixed pool of blocks per (layer, sequence, KV head). Offload-aware methods
(`supports_kv_offload = True`: lfps, lychee+lfps) reach the cache through `cache_attention` /
`cache_index`, which run the fused op directly on an on-device cache and go through the pool (or the CPU
index) on an offloaded one.
"""
from __future__ import annotations

from typing import Any

import torch

from ..engine.kv_cache import KVCache
from ..kernels import sparse_decode_attention
from .cache import OffloadConfig, OffloadedKVCache, offload_config
from .prefill import prefill_layer_major

__all__ = [
    "OffloadConfig", "OffloadedKVCache", "cache_attention", "cache_index", "check_offload_method", "offload_config",
    "prefill_layer_major", "reserve_pool",
]


def cache_attention(
    cache: KVCache, layer: int, q: torch.Tensor, seq_lens: torch.Tensor, scale: float, unit_size: int = 64,
    unit_lists: torch.Tensor | None = None, unit_counts: torch.Tensor | None = None,
    full_rows: torch.Tensor | None = None, unit_lse: torch.Tensor | None = None, sorted_lists: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_decode_attention` over layer `layer` of `cache`, wherever its K/V live (`sorted_lists`
    applies on the device; an offloaded cache maps the lists to pool slots of its own order)."""
    if isinstance(cache, OffloadedKVCache):
        return cache.attention(layer, q, seq_lens, scale, unit_size, unit_lists, unit_counts, full_rows, unit_lse)
    return sparse_decode_attention(q, cache.k[layer], cache.v[layer], seq_lens, scale, unit_size, unit_lists,
                                   unit_counts, full_rows, unit_lse, sorted_lists=sorted_lists)


def cache_index(
    cache: KVCache, layer: int, q: torch.Tensor, seq_lens: torch.Tensor, scale: float, unit_size: int,
    unit_lists: torch.Tensor, unit_counts: torch.Tensor, full_rows: torch.Tensor | None, unit_lse: torch.Tensor,
) -> torch.Tensor:
    """Fill `unit_lse` with the exact per-block scores of the visited blocks and return the lse [B, Hq];
    the attention output is not needed. On the GPU the fused op is the cheapest way (its output is
    dropped); offloaded, the scores come from the CPU index or the pool."""
    if isinstance(cache, OffloadedKVCache):
        return cache.index(layer, q, seq_lens, scale, unit_size, unit_lists, unit_counts, full_rows, unit_lse)
    return cache_attention(cache, layer, q, seq_lens, scale, unit_size, unit_lists, unit_counts, full_rows, unit_lse,
                           sorted_lists=True)[1]


def reserve_pool(cache: KVCache, blocks: int) -> None:
    """Tell an offloaded cache how many blocks per row one step of the method visits (sizes its GPU pool)."""
    if isinstance(cache, OffloadedKVCache):
        cache.reserve(blocks)


def check_offload_method(method: Any) -> None:
    if not getattr(method, "supports_kv_offload", False):
        raise ValueError(
            f"method {method.name!r} cannot decode from an offloaded KV cache (it reads the cache on the GPU "
            "directly); kv_offload works with the methods 'lfps' and 'lychee+lfps'"
        )
