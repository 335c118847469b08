"""The layer under models, methods, offload and roles: the paged KV pool interface, the per-step batch
description that methods read, and the block-list format (`BlockSelector`: scores to fixed-shape lists)."""
from .batch import DecodeBatch
from .kv_pool import KVPool, check_gpu_memory_utilization, kv_pool_budget_bytes
from .selection import BlockSelector, block_scores

__all__ = ["BlockSelector", "DecodeBatch", "KVPool", "block_scores", "check_gpu_memory_utilization",
           "kv_pool_budget_bytes"]
