"""The KV pool's block accounting: which physical blocks are free, which sequence tables hold which blocks,
and (optionally) which full blocks hold a known token prefix, so a new request with the same prefix reuses
them instead of recomputing.

Block 0 is the pool's null block and never handed out. A block's hash covers its tokens and every token
before it (a chain), so equal hashes mean equal K/V. Only full blocks that lie wholly before a
sequence's last prompt token are shared: a sequence never writes into a block it shares. A freed block
keeps its hash until it is handed out again, so a prefix stays reusable while its blocks are free.
"""
from __future__ import annotations

import hashlib
from collections import deque

import numpy as np

from ..core.kv_pool import NULL_BLOCK
from .sequence import Sequence


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(parent + np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding that prefix
        self.free_ids: deque[int] = deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        # the prompt's last tokens that a prefill computes even when cached: its last one (whose logits
        # sample the first token), or more when the method observes the prompt's last queries
        self.recompute_tokens = 1

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission ------------------------------------------------------------------------------
    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the sequence's leading full blocks, up to (not including) the block of the
        first of the `recompute_tokens` last tokens it will prefill."""
        if not self.enable_prefix_caching:
            return []
        tokens, hits, parent = seq.all_token_ids, [], b""
        for i in range(max(seq.prefill_target - self.recompute_tokens, 0) // self.block_size):
            parent = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.cached.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for the tokens it prefills, reusing cached prefix blocks. False (and
        nothing changed) when the free blocks do not suffice."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self._prefix_hits(seq)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # cached but free: leave the free list
        needed = self.blocks_for(seq.prefill_target) - len(hits)
        if needed + revived > self.num_free_blocks:
            return False
        for block in hits:
            if self.ref_counts[block] == 0:
                self.free_ids.remove(block)
            self.ref_counts[block] += 1
        seq.block_table = hits + [self._take_free() for _ in range(needed)]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        return True

    def _take_free(self) -> int:
        block = self.free_ids.popleft()
        stale = self.hashes[block]
        if stale is not None and self.cached.get(stale) == block:
            del self.cached[stale]
        self.hashes[block] = None
        self.ref_counts[block] = 1
        return block

    # -- growth and release -----------------------------------------------------------------------
    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the table to hold `num_tokens` tokens; False (nothing changed) when blocks run out."""
        extra = self.blocks_for(num_tokens) - len(seq.block_table)
        if extra > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take_free() for _ in range(max(extra, 0)))
        return True

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (shared ones stay with their other holders)."""
        for block in reversed(seq.block_table):  # tail first: the prefix's blocks are the last reused
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_ids.append(block)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's computed full blocks under their prefix hashes."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        tokens = seq.all_token_ids
        parent = self.hashes[seq.block_table[seq.num_hashed_blocks - 1]] if seq.num_hashed_blocks else b""
        for i in range(seq.num_hashed_blocks, full):
            block = seq.block_table[i]
            if self.hashes[block] is None:
                self.hashes[block] = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
                self.cached.setdefault(self.hashes[block], block)
            parent = self.hashes[block]
        seq.num_hashed_blocks = full
