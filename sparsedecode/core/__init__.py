"""The lowest layer: the paged KV pool interface and the per-step batch description that methods read."""
from .batch import DecodeBatch
from .kv_pool import KVPool

__all__ = ["DecodeBatch", "KVPool"]
