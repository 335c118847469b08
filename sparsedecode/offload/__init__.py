"""KV offload: the paged KV pool in host memory for contexts larger than the GPU (`LLM(..., kv_offload="cpu")`).

`OffloadedKVPool` replaces the on-device `KVPool`: offload-aware methods (`supports_kv_offload = True`:
lfps, lychee+lfps) reach it through the same interface (`attention`, `index`, `reserve`, `prefetch`),
which it serves from a block staging pool on the GPU (or, for the index, the CPU); `transfer_counts`
says what crossed the host link. See `cache`.
"""
from .cache import (OffloadConfig, OffloadedKVPool, TransferCounts, check_offload_method, offload_config,
                    offload_pool_blocks, offload_staging_bytes)

__all__ = ["OffloadConfig", "OffloadedKVPool", "TransferCounts", "check_offload_method", "offload_config",
           "offload_pool_blocks", "offload_staging_bytes"]
