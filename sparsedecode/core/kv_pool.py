"""The paged KV pool: every layer's keys and values in blocks of `block_size` tokens, shared by all sequences.

Layout `[layers, num_blocks, kv_heads, block_size, head_dim]`: one (block, KV head) is a contiguous
`block_size * head_dim` slab, so kernels read whole blocks with unit-stride loads. A sequence owns a
block table (its logical blocks -> physical block ids); selections stay in logical block indices and only
the kernels that read K/V translate them. Block 0 is the null block: no sequence owns it, and rows of a
decode batch without a sequence point there.

The pool is also the interface through which methods reach K/V: `attention`, `index`, `reserve` and
`prefetch` act on the device here; a pool that keeps its blocks elsewhere (host memory) overrides them.
"""
from __future__ import annotations

import torch

from ..kernels import paged_prefill_attention, sparse_decode_attention, store_kv
from .batch import DecodeBatch

NULL_BLOCK = 0


def check_gpu_memory_utilization(value: float) -> None:
    """ValueError unless `value`, the share of GPU memory a pool may be sized from, is in (0, 1]."""
    if not 0 < value <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], not {value}")


def kv_pool_budget_bytes(total: int, free: int, held: int, transient: int, utilization: float) -> int:
    """Bytes a process may give its KV pool on a GPU of `total` bytes: `utilization` of it, less what the
    process `held` already (weights) and the `transient` bytes its steps need (activations, margin), and
    never more than is `free` now less `transient`. The share is the process's own (as vLLM's
    `gpu_memory_utilization`): two processes at 0.45 share one GPU whatever order they start in."""
    check_gpu_memory_utilization(utilization)
    return int(min(total * utilization - held - transient, free - transient))


class KVPool:
    #: whether `prefetch` does anything (methods skip computing the next layer's lists otherwise)
    prefetches = False
    #: whether the K/V live off the device (host memory): the runner then prefills a sequence whole, one
    #: layer at a time (`ModelRunner.prefill_layer_major`)
    layer_major_prefill = False
    #: whether decode steps over this pool can be captured in CUDA graphs (no call syncs with the host)
    decode_graphs = True

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (the null block and one more), not {num_blocks}")
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        # Zeros, not empty: the reference path multiplies masked positions by probability 0, and 0 * NaN is NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * block_size * head_dim * dtype.itemsize

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def host_nbytes(self) -> int:
        """Bytes of the pool in host memory: none here (an offloaded pool keeps some there)."""
        return 0

    def staging_nbytes(self) -> int:
        """Device bytes of a staging pool for blocks kept elsewhere: none here."""
        return 0

    def store(self, layer: int | torch.Tensor, block_ids: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write token i's k[i], v[i] ([n, kv_heads, head_dim]) at (block_ids[i], offsets[i]) of `layer`."""
        store_kv(self.k, self.v, layer, block_ids, offsets, k, v)

    def prefill_attention(self, layer: int, q: torch.Tensor, blocks: torch.Tensor, end: int) -> torch.Tensor:
        """Causal attention of one sequence's prompt chunk q [n, Hq, D] (positions end - n .. end - 1, its K/V
        stored already) over its keys 0 .. end, read in place through its block table `blocks` (at least
        ceil(end / block_size) entries): `kernels.paged_prefill_attention`. Returns [n, Hq, D]."""
        return paged_prefill_attention(q, self.k[layer], self.v[layer], blocks[None], [0, q.shape[0]], [end])

    # -- what methods call: on-device defaults ------------------------------------------------------
    def attention(self, layer: int, q: torch.Tensor, batch: DecodeBatch, scale: float, unit_size: int = 64,
                  unit_lists: torch.Tensor | None = None, unit_counts: torch.Tensor | None = None,
                  full_rows: torch.Tensor | None = None, unit_lse: torch.Tensor | None = None,
                  sorted_lists: bool = False, scored_rows: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """`kernels.sparse_decode_attention` of q [B, Hq, D] over this pool's layer `layer` (same unit lists,
        full rows, per-unit scores and scored rows); returns (out [B, Hq, D], lse [B, Hq])."""
        return sparse_decode_attention(q, self.k[layer], self.v[layer], batch.seq_lens, scale, unit_size,
                                       unit_lists, unit_counts, full_rows, unit_lse,
                                       block_tables=batch.block_tables, sorted_lists=sorted_lists,
                                       scored_rows=scored_rows)

    def index(self, layer: int, q: torch.Tensor, batch: DecodeBatch, scale: float, unit_size: int,
              unit_lists: torch.Tensor, unit_counts: torch.Tensor, full_rows: torch.Tensor | None, unit_lse: torch.Tensor) -> torch.Tensor:
        """Exact per-unit scores of the listed units into `unit_lse`; returns lse [B, Hq]. On the device the
        fused op is the cheapest way (its output is dropped)."""
        return self.attention(layer, q, batch, scale, unit_size, unit_lists, unit_counts, full_rows, unit_lse,
                              sorted_lists=True)[1]

    def reserve(self, blocks_per_row: int) -> None:
        """How many blocks one (sequence, KV head) visits per step at most: sizes a staging pool elsewhere."""

    def reserve_rows(self, rows: int) -> bool:
        """Decode steps will cover `rows` rows: a pool with per-row device buffers grows them here, outside
        any captured step. True when buffers were reallocated (steps captured before read the old ones)."""
        return False

    def prefetch(self, layer: int, batch: DecodeBatch, unit_lists: torch.Tensor, unit_counts: torch.Tensor) -> None:
        """These lists will be read by layer `layer` next: a pool in host memory starts moving them."""
