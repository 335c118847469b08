"""The paged KV pool in host memory, for contexts larger than the GPU (`LLM(..., kv_offload="cpu")`).

`OffloadedKVPool` keeps every block's V (and K, unless the index runs on the GPU) in pinned host memory
mapped into the device's address space, in the on-device pool's layout `[layers, num_blocks, kv_heads,
block_size, head_dim]`: a host block is addressed by the physical block id of the block tables.
Offload-aware methods (`supports_kv_offload = True`: lfps, lychee+lfps) reach it only through the pool
interface (`attention`, `index`, `reserve`, `prefetch`, `store`), which this pool implements over a
staging pool on the GPU. Every decision is taken on the device with fixed shapes, so with the index on
the GPU a decode step over this pool is captured in a CUDA graph like any other (`decode_graphs`).

Staging pool: per (layer, decode row, KV head) `pool_blocks` slots of one block. The last slot holds the
row's newest block, which every step writes: it is moved at every read. The other slots cache complete
blocks, least recently used first out, so a selection that changes slowly from step to step moves only
its new blocks over the host link. Bookkeeping per slot, on the device: the physical block it holds, the
block's write count when it was moved there, and the call that last read it. A copy is current while
the block's write count (`store` adds one per write) is unchanged, so a freed block that another
sequence rewrites is moved anew, while a block two sequences share stays current in both rows' slots.

A call places its list (`staging.plan_staging`, compiled on CUDA engines): the blocks held by current
slots are hits; each missing one takes the least recently used slot that the call does not read (empty
and stale slots first). The moves of every missing block of the call, K and V, are one launch
(`kernels.gather_host_blocks`: a kernel reading the host memory in place over the host link), then the
fused op runs over the staged slots listed in block order. A row that reads more blocks than its slots (a full row of a context longer than the
staging pool, or a longer list) is read in place from host memory by the fused op instead (zero-copy,
nothing staged); a call with such rows runs the op twice, staged rows and in-place rows, and merges by
row. Full rows of contexts the staging pool holds whole are staged as the list of all their blocks.

Copies on a side stream: `prefetch` (the next layer's predicted blocks, called while this layer
computes) places and moves on the copy stream, which first waits for the compute stream's work so far;
the compute stream waits for it before it next touches that layer (`store`, `attention`). Reads and
overwrites of a slot are so always ordered: a slot is never overwritten while a call still reads it.

The index (`index`: exact block scores without an attention output) runs over the keys in host memory
on the CPU (`OffloadConfig.index = "cpu"`: eager, every call syncs with the host), or on the GPU ("gpu"),
where the keys then live in the on-device pool's layout: only the values stay in host memory and cross
the host link, and staged keys are gathered on the device. That splits the K/V between the two
memories, so a context that fits neither alone decodes from both together (docs/notes/2026-11-24-lfps-offload.md).

Prefill: the pool sets `layer_major_prefill`, so the engine prefills a sequence whole, one layer at a
time (`ModelRunner.prefill_layer_major`): each layer's K/V cross the host link once, and the device never
holds every layer's prefix. `gather` (a chunk's prefix on the device) is refused.

Parity: with the GPU index the scores are the on-device op's bits, and a staged call visits the same
blocks in the same order as the on-device op, so offloaded decoding gives the on-device tokens; a call
with rows read in place splits the op's work differently and rounds otherwise. The CPU index rounds
differently, which can flip a near-tie in a top-k (random weights have many).
On a CPU device, host and device are the same memory: no pinning and no streams (a mode for tests).
"""
from __future__ import annotations

import operator
import os
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..core import DecodeBatch, KVPool, check_gpu_memory_utilization
from ..kernels import sparse_decode_attention, store_kv
from ..kernels.gather_host_blocks import gather_host_blocks
from .scoring import block_lse, torch_threads
from .staging import Staging, may_read_in_place, plan_staging, staging_pool_bytes

INDEX_SIDES = ("cpu", "gpu")
HOST_MEMORY_FRACTION = 0.9  # of the host's available memory, for an offloaded pool whose size is not given


@dataclass(frozen=True)
class OffloadConfig:
    """Options of `kv_offload="cpu"`; pass an instance as `kv_offload` to change them."""

    # where index-only scoring runs: "cpu" over the keys in host memory; "gpu" over the keys, which then
    # live on the GPU (half the pool's bytes there; only values in host memory and over the host link)
    index: str = "cpu"
    pool_blocks: int | None = None  # GPU slots per (layer, sequence, KV head), newest included; None: as the method asks
    prefetch: bool = True  # copy the next layer's predicted blocks while this layer computes
    cpu_threads: int | None = None  # threads of the CPU index; None: PyTorch's (torch.get_num_threads())

    def __post_init__(self) -> None:
        if self.index not in INDEX_SIDES:
            raise ValueError(f"OffloadConfig.index must be one of {INDEX_SIDES}, not {self.index!r}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ValueError(f"OffloadConfig.cpu_threads must be a positive integer or None, not {self.cpu_threads!r}")
        if self.pool_blocks is not None and self.pool_blocks < 2:
            raise ValueError(f"OffloadConfig.pool_blocks must be at least 2 (a block and the newest), not {self.pool_blocks}")


def offload_config(value: str | OffloadConfig | None, device: torch.device) -> OffloadConfig | None:
    """The `kv_offload` argument of `LLM`, checked: None, "cpu" or an OffloadConfig."""
    if value is None:
        return None
    if isinstance(value, str) and value == "cpu":
        value = OffloadConfig()
    if not isinstance(value, OffloadConfig):
        raise ValueError(f"kv_offload must be None, 'cpu' or an OffloadConfig, not {value!r}")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"kv_offload needs a CUDA device (pinned host memory and copy streams), not {device.type!r}; "
            "on 'cpu' it runs with host and device as one memory, for tests"
        )
    return value


def check_offload_method(method: Any) -> None:
    """Refuse a decode method (class or instance) that reads K/V other than through the pool interface."""
    if not getattr(method, "supports_kv_offload", False):
        raise ValueError(
            f"method {method.name!r} cannot decode from an offloaded KV cache (it reads the cache on the GPU "
            "directly); kv_offload works with the methods 'lfps' and 'lychee+lfps'"
        )


def available_host_bytes() -> int:
    """Host memory the kernel reports available (MemAvailable), or its free pages where it reports none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_gpu_bytes(device: torch.device) -> tuple[int, int]:
    """(bytes one new allocation can take, bytes free to PyTorch in all) on `device`. PyTorch's cache is given
    back first; what it keeps are the unused parts of segments still in use (such as those weights made in
    float32 and converted leave behind): they serve small tensors, never a pool."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return free, free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def offload_pool_blocks(config: OffloadConfig, wanted: int, block_bytes: int, device: torch.device,
                        gpu_memory_utilization: float, staging_bytes: int) -> int:
    """Blocks of an offloaded pool on a GPU when none are given: `wanted`, or fewer where
    HOST_MEMORY_FRACTION of the host's available memory does not hold their host part (V, and K with the
    CPU index) or, with the GPU index, the GPU does not hold their keys beside the staging pool of
    `staging_bytes` (`offload_staging_bytes`): keys and staging take at most `gpu_memory_utilization` of
    the GPU memory free to PyTorch (the rest is left to activations) and at most what new allocations
    can take (`free_gpu_bytes`). `block_bytes`: K and V of one block, all layers."""
    check_gpu_memory_utilization(gpu_memory_utilization)
    part = block_bytes // 2
    keys_on_device = config.index == "gpu"
    host_budget = int(available_host_bytes() * HOST_MEMORY_FRACTION)
    blocks = min(wanted, host_budget // (part if keys_on_device else block_bytes))
    if blocks < 2:
        raise RuntimeError(f"no memory left for an offloaded KV pool ({host_budget / 2**30:.1f} GiB of host memory "
                           "available): free some, or give num_blocks")
    if keys_on_device:
        allocatable, usable = free_gpu_bytes(device)
        keys_budget = min(int(usable * gpu_memory_utilization), allocatable) - staging_bytes
        if keys_budget < 2 * part:
            raise RuntimeError(
                f"no GPU memory left for the offloaded pool's keys: of {usable / 2**30:.1f} GiB free, "
                f"gpu_memory_utilization={gpu_memory_utilization} less the staging pools "
                f"({staging_bytes / 2**30:.1f} GiB) leaves {keys_budget / 2**30:.1f} GiB, and a block's keys take "
                f"{part / 2**20:.1f} MiB: lower max_num_seqs or OffloadConfig.pool_blocks, raise "
                "gpu_memory_utilization, or give num_blocks")
        blocks = min(blocks, keys_budget // part)
    return blocks


class _ReservationProbe(KVPool):
    """A two-block pool on the device that records the staging pool a method's `plan` reserves."""

    blocks_per_row = 0

    def reserve(self, blocks_per_row: int) -> None:
        self.blocks_per_row = blocks_per_row


def offload_staging_bytes(config: OffloadConfig, method: Any, rows: int, max_blocks: int, num_layers: int,
                          num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
                          device: torch.device) -> int:
    """Device bytes of the staging pool an offloaded pool takes for `rows` decode rows of sequences up to
    `max_blocks` blocks: `config.pool_blocks` slots per (layer, row, KV head), or as many as `method`
    reserves in `plan` (its candidate lists; found by planning it over a two-block probe pool). An upper
    bound: a pool of fewer blocks than that takes fewer slots (`OffloadedKVPool.reserve`)."""
    slots = config.pool_blocks
    if slots is None:
        probe = _ReservationProbe(num_layers, 2, num_kv_heads, block_size, head_dim, dtype, device)
        method.plan(probe, rows, max_blocks)
        slots = probe.blocks_per_row
    return staging_pool_bytes(num_layers, rows, num_kv_heads, max(2, slots), block_size, head_dim, dtype)


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A host tensor of exactly this size. Pinned: page-locked in place (PyTorch's pinned allocator rounds
    every request up to a power of two, which could nearly double a large pool) and not cleared (clearing a
    large pool takes long; the kernels mask what lies past a sequence's length). Otherwise zeros: a CPU device's
    reference path multiplies masked positions by probability 0, and 0 * NaN is NaN."""
    if not pinned:
        return torch.zeros(shape, dtype=dtype)
    tensor = torch.empty(shape, dtype=dtype)
    nbytes, cudart = tensor.numel() * tensor.element_size(), torch.cuda.cudart()
    # 3: cudaHostRegisterPortable | cudaHostRegisterMapped, so that kernels read and write it in place
    error = int(cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 3))
    if error:
        raise RuntimeError(f"could not page-lock {nbytes / 2**30:.1f} GiB of host memory for the offloaded "
                           f"KV pool (CUDA error {error}): too little host memory for this pool? Give num_blocks")
    weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())
    return tensor


#: columns of `OffloadedKVPool.counters` (per layer, in (block, KV head) slabs)
COUNTERS = ("listed", "fetched", "newest", "prefetched", "in_place")


@dataclass(frozen=True)
class TransferCounts:
    """What an offloaded pool moved since it was made, in slabs (one block of one KV head of one layer);
    differences of two snapshots (`a - b`) count what happened in between, sums (`a + b`) add periods."""

    listed: int  # complete blocks the staged attention calls read
    fetched: int  # of those, the ones not resident: moved by the call itself
    newest: int  # newest blocks (written every step), moved at every read
    prefetched: int  # moved by `prefetch` ahead of the call that reads them
    in_place: int  # blocks of rows too long for their slots, read in place from host memory by the op
    link_bytes_per_slab: int  # bytes one slab takes over the host link (V; K too when it lives on the host)

    def _combine(self, other: TransferCounts, op: Any) -> TransferCounts:
        return TransferCounts(*(op(getattr(self, f), getattr(other, f)) for f in COUNTERS), self.link_bytes_per_slab)

    def __add__(self, other: TransferCounts) -> TransferCounts:
        return self._combine(other, operator.add)

    def __sub__(self, other: TransferCounts) -> TransferCounts:
        return self._combine(other, operator.sub)

    @property
    def hit_rate(self) -> float | None:
        """Share of the complete blocks read by staged calls that were already on the GPU (prefetched
        ones included); None when nothing was read."""
        return 1 - self.fetched / self.listed if self.listed else None

    @property
    def link_bytes(self) -> int:
        """Bytes read from host memory over the host link."""
        return (self.fetched + self.prefetched + self.newest + self.in_place) * self.link_bytes_per_slab


class OffloadedKVPool(KVPool):
    prefetches = True
    layer_major_prefill = True

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, *, config: OffloadConfig,
                 compiled: bool = False) -> None:
        """`compiled`: run the staging bookkeeping through torch.compile (on CUDA, as the model's
        `compile_decode`): a few fused kernels per call instead of about a hundred small ones."""
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (the null block and one more), not {num_blocks}")
        self.config = config
        self.compute_device = torch.device(device)
        on_gpu = self.compute_device.type == "cuda"
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.k = (torch.zeros(shape, dtype=dtype, device=device) if self.keys_on_device
                  else host_tensor(shape, dtype, on_gpu))
        self.v = host_tensor(shape, dtype, on_gpu)
        self.prefetches = config.prefetch  # methods skip computing the next layer's lists when off
        self.copy_stream = torch.cuda.Stream(self.compute_device) if on_gpu else None
        # Writes per (layer, block): a staged copy is current while the count is the one it was moved at.
        self.writes = torch.zeros(num_layers, num_blocks, dtype=torch.int64, device=device)
        self.counters = torch.zeros(num_layers, len(COUNTERS), dtype=torch.int64, device=device)
        self.in_flight: dict[int, tuple[torch.Tensor, ...]] = {}  # layer -> inputs a prefetch reads on the copy stream
        self.plan_staging = torch.compile(plan_staging, fullgraph=True) if compiled else plan_staging
        self.pool_blocks = 0
        self.rows = 0

    @property
    def keys_on_device(self) -> bool:
        """Whether K lives on the compute device (index "gpu") rather than in host memory."""
        return self.config.index == "gpu"

    @property
    def decode_graphs(self) -> bool:
        """Decode steps are graph-capturable unless the index runs on the CPU (it reads the queries there)."""
        return self.keys_on_device

    @property
    def device(self) -> torch.device:
        return self.compute_device

    def host_nbytes(self) -> int:
        """Bytes of the pool in host memory (V, and K unless it lives on the device)."""
        return self.nbytes() // 2 * (1 if self.keys_on_device else 2)

    def staging_nbytes(self) -> int:
        """Device bytes of the staging pool (slots and bookkeeping); 0 before it has rows."""
        if not self.rows:
            return 0
        return staging_pool_bytes(self.num_layers, self.rows, self.num_kv_heads, self.pool_blocks, self.block_size,
                                  self.head_dim, self.dtype)

    def transfer_counts(self) -> TransferCounts:
        """The moves so far, summed over layers (one host synchronisation)."""
        slab = self.block_size * self.head_dim * self.dtype.itemsize * (1 if self.keys_on_device else 2)
        return TransferCounts(*self.counters.sum(0).tolist(), slab)

    # -- the staging pool ---------------------------------------------------------------------------
    def reserve(self, blocks_per_row: int) -> None:
        """Size the staging pool for `blocks_per_row` slots per row (newest included), or
        `config.pool_blocks` when set."""
        slots = max(2, min(self.config.pool_blocks or blocks_per_row, self.num_blocks - 1))
        if slots != self.pool_blocks:
            self.pool_blocks = slots
            self._stage(self.rows)

    def reserve_rows(self, rows: int) -> bool:
        """Grow the staging pool to `rows` decode rows; True when it was reallocated."""
        if not self.pool_blocks:
            raise RuntimeError("the offloaded KV pool has no staging pool: the method must `reserve` one in plan()")
        if rows <= self.rows:
            return False
        self._stage(rows)
        return True

    def _stage(self, rows: int) -> None:
        """(Re)allocate the staging pool for `rows` decode rows; nothing staged is kept."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy into the old slots is in flight
        self.in_flight.clear()
        self.rows = rows
        layers, heads, slots, device = self.num_layers, self.num_kv_heads, self.pool_blocks, self.device
        shape = (layers, rows, heads, slots * self.block_size, self.head_dim)
        self.k_staged = self.v_staged = None  # the old staging pool goes first
        try:
            self.k_staged = torch.zeros(shape, dtype=self.dtype, device=device)
            self.v_staged = torch.zeros(shape, dtype=self.dtype, device=device)
        except torch.cuda.OutOfMemoryError as e:
            nbytes = staging_pool_bytes(layers, rows, heads, slots, self.block_size, self.head_dim, self.dtype)
            raise RuntimeError(
                f"the offloaded pool's staging pool for {rows} decode rows ({slots} blocks per row, layer and KV "
                f"head) needs {nbytes / 2**30:.1f} GiB on the GPU: lower max_num_seqs or OffloadConfig.pool_blocks, "
                "or give fewer num_blocks (with the GPU index the keys are sized to leave it room)") from e
        # Per cached slot (all but the last, the newest's; the last column takes the scatters of entries
        # that change nothing): the physical block held (-1: none), its write count when moved, the tick
        # of the call that last read it. One tick counter per layer: calls of a layer are ordered.
        self.held = torch.full((layers, rows, heads, slots), -1, dtype=torch.int64, device=device)
        self.held_writes = torch.zeros_like(self.held)
        self.last_use = torch.full_like(self.held, -1)
        self.ticks = torch.zeros(layers, dtype=torch.int64, device=device)

    def _rows_for(self, batch: DecodeBatch) -> None:
        """Grow the staging pool for a batch larger than it (eagerly; the model runner grows it with
        `reserve_rows` before it captures a step)."""
        self.reserve_rows(batch.size)

    def _join(self, layer: int) -> None:
        """The compute stream waits for a prefetch of `layer` still on the copy stream."""
        if self.in_flight.pop(layer, None) is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def _plan(self, layer: int, batch: DecodeBatch, unit_lists: torch.Tensor, unit_counts: torch.Tensor,
              full_rows: torch.Tensor | None, sorted_lists: bool, prefetch: bool) -> Staging:
        """Place a call's blocks in layer `layer`'s slots (`staging.plan_staging`), keep the new bookkeeping
        and count the moves; returns the plan."""
        size = batch.size
        self.ticks[layer].add_(1)
        plan = self.plan_staging(batch.block_tables, batch.seq_lens, unit_lists, unit_counts, full_rows,
                                 self.held[layer, :size], self.held_writes[layer, :size], self.last_use[layer, :size],
                                 self.ticks[layer], self.writes[layer], self.block_size, sorted_lists, not prefetch)
        self.held[layer, :size].copy_(plan.held)
        self.held_writes[layer, :size].copy_(plan.held_writes)
        self.last_use[layer, :size].copy_(plan.last_use)
        if prefetch:
            self.counters[layer, COUNTERS.index("prefetched")].add_(plan.counts[1])
        else:  # listed, fetched, newest
            self.counters[layer, :3].add_(plan.counts)
        return plan

    def _move(self, layer: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """One launch for all the moves (flat slab indices) of a layer, K and V."""
        width = self.block_size * self.head_dim
        gather_host_blocks(self.k[layer].view(-1, width), self.v[layer].view(-1, width),
                           self.k_staged[layer].view(-1, width), self.v_staged[layer].view(-1, width), src, dst)

    # -- what methods call ----------------------------------------------------------------------------
    def prefetch(self, layer: int, batch: DecodeBatch, unit_lists: torch.Tensor, unit_counts: torch.Tensor) -> None:
        """Start moving the complete blocks of these lists into layer `layer`'s slots (on the copy stream)."""
        self._rows_for(batch)
        self._join(layer)
        stream = self.copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            # the inputs stay referenced until the compute stream joins (their memory is not reused meanwhile)
            self.in_flight[layer] = (unit_lists, unit_counts, batch.block_tables, batch.seq_lens)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            plan = self._plan(layer, batch, unit_lists, unit_counts, None, sorted_lists=False, prefetch=True)
            self._move(layer, plan.src, plan.dst)

    def attention(self, layer: int, q: torch.Tensor, batch: DecodeBatch, scale: float, unit_size: int = 64,
                  unit_lists: torch.Tensor | None = None, unit_counts: torch.Tensor | None = None,
                  full_rows: torch.Tensor | None = None, unit_lse: torch.Tensor | None = None,
                  sorted_lists: bool = False, scored_rows: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """`KVPool.attention` over the staged blocks (and rows too long for them in place): the same
        arguments and results."""
        self._check_unit(unit_size)
        self._rows_for(batch)
        self._join(layer)
        size, bs, device = batch.size, self.block_size, self.device
        if unit_lists is None:  # dense: every row full
            unit_lists = torch.zeros(size, self.num_kv_heads, 1, dtype=torch.int32, device=device)
            unit_counts = torch.zeros(size, self.num_kv_heads, dtype=torch.int32, device=device)
            full_rows = torch.ones(size, self.num_kv_heads, dtype=torch.bool, device=device)
        plan = self._plan(layer, batch, unit_lists, unit_counts, full_rows, sorted_lists, prefetch=False)
        self._move(layer, plan.src, plan.dst)
        # The op over the slots, listed in block order (the newest, last in the list, in the last slot): it
        # visits the blocks as it visits them in the on-device pool, so a staged row gets its bits. The
        # staged length ends right after the newest block's last token, which masks the rest of its slot.
        slot_lse = None
        if unit_lse is not None:
            slot_lse = torch.empty(size, q.shape[1], self.pool_blocks, dtype=torch.float32, device=device)
        out, lse = sparse_decode_attention(
            q, self.k_staged[layer, :size], self.v_staged[layer, :size], plan.staged_lens, scale, bs,
            plan.slot_lists, plan.staged_counts, None, slot_lse, sorted_lists=True, scored_rows=scored_rows,
        )
        if unit_lse is not None:
            self._scatter_scores(unit_lse, slot_lse, plan.blocks, plan.entry_slots)
        if not may_read_in_place(batch.block_tables.shape[1], self.pool_blocks, unit_lists.shape[-1],
                                 full_rows is not None):
            return out, lse
        return self._merge_in_place(layer, q, batch, scale, unit_lists, unit_counts, full_rows, plan,
                                    sorted_lists, out, lse, unit_lse, scored_rows)

    def _merge_in_place(self, layer: int, q: torch.Tensor, batch: DecodeBatch, scale: float,
                        unit_lists: torch.Tensor, unit_counts: torch.Tensor, full_rows: torch.Tensor | None,
                        plan: Staging, sorted_lists: bool, out: torch.Tensor, lse: torch.Tensor,
                        unit_lse: torch.Tensor | None, scored_rows: torch.Tensor | None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows read in place: the op over the pool itself (host memory, read over the host link by
        the kernel), those rows only; their results replace the staged call's."""
        in_place = plan.in_place
        full = None if full_rows is None else full_rows & in_place
        in_place_lse = None if unit_lse is None else torch.empty_like(unit_lse)
        out2, lse2 = sparse_decode_attention(q, self.k[layer], self.v[layer], batch.seq_lens, scale, self.block_size,
                                             unit_lists, torch.where(in_place, unit_counts, 0), full, in_place_lse,
                                             sorted_lists=sorted_lists, block_tables=batch.block_tables,
                                             scored_rows=scored_rows)
        held = (batch.seq_lens.long() + self.block_size - 1) // self.block_size
        visited = plan.visits if full is None else torch.where(full, held[:, None], plan.visits)
        self.counters[layer, COUNTERS.index("in_place")].add_(torch.where(in_place, visited, 0).sum())
        rows = in_place.repeat_interleave(q.shape[1] // self.num_kv_heads, dim=1)
        if unit_lse is not None:
            unit_lse.copy_(torch.where(rows[..., None], in_place_lse, unit_lse))
        return torch.where(rows[..., None], out2, out), torch.where(rows, lse2, lse)

    def _scatter_scores(self, unit_lse: torch.Tensor, slot_lse: torch.Tensor, blocks: torch.Tensor,
                        entry_slots: torch.Tensor) -> None:
        """Move per-slot scores [B, Hq, P] to their blocks in unit_lse [B, Hq, NB]: entry e of a row is
        block blocks[..., e] in slot entry_slots[..., e] (P: not listed). Spare columns take the padding."""
        batch, num_heads, num_blocks = unit_lse.shape
        slot_blocks = torch.full((batch, self.num_kv_heads, self.pool_blocks + 1), num_blocks, dtype=torch.int64,
                                 device=unit_lse.device)
        slot_blocks.scatter_(-1, entry_slots, blocks.clamp(max=num_blocks))
        target = slot_blocks[..., :-1].repeat_interleave(num_heads // self.num_kv_heads, dim=1)
        spread = torch.full((batch, num_heads, num_blocks + 1), float("-inf"), device=unit_lse.device)
        spread.scatter_(2, target, slot_lse)
        unit_lse.copy_(spread[..., :num_blocks])

    def index(self, layer: int, q: torch.Tensor, batch: DecodeBatch, scale: float, unit_size: int,
              unit_lists: torch.Tensor, unit_counts: torch.Tensor, full_rows: torch.Tensor | None,
              unit_lse: torch.Tensor) -> torch.Tensor:
        """Exact per-block scores of the visited blocks into unit_lse; returns lse [B, Hq]."""
        self._check_unit(unit_size)
        if self.keys_on_device:
            # The op the on-device pool scores with (its output, over K as values, is dropped): the same
            # scores to the bit, so offloaded decoding selects the same blocks even at near-ties.
            return sparse_decode_attention(q, self.k[layer], self.k[layer], batch.seq_lens, scale, unit_size,
                                           unit_lists, unit_counts, full_rows, unit_lse,
                                           block_tables=batch.block_tables, sorted_lists=True)[1]
        host = torch.device("cpu")
        scores = torch.empty(unit_lse.shape, dtype=torch.float32)
        with torch_threads(self.config.cpu_threads):  # q's copy to the host waits for the stores before
            lse = block_lse(q.to(host), self.k[layer], batch.seq_lens.to(host), scale, unit_size,
                            unit_lists.to(host), unit_counts.to(host),
                            None if full_rows is None else full_rows.to(host), scores,
                            block_tables=batch.block_tables.to(host))
        unit_lse.copy_(scores)
        return lse.to(self.device)

    def _check_unit(self, unit_size: int) -> None:
        if unit_size != self.block_size:
            raise ValueError(f"an offloaded KV pool reads whole blocks of {self.block_size} tokens, not units of "
                             f"{unit_size}: give the method block_size={self.block_size}")

    # -- K/V in and out -----------------------------------------------------------------------------
    def store(self, layer: int | torch.Tensor, block_ids: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write token i's k[i], v[i] at (block_ids[i], offsets[i]) of `layer`: V (and K unless it lives on
        the device) into host memory, written in place by the kernel over the host link; the written
        blocks' staged copies are stale from then on."""
        layer = int(layer)
        self._join(layer)
        store_kv(self.k, self.v, layer, block_ids, offsets, k, v)
        self.writes[layer].index_add_(0, block_ids.long(), torch.ones_like(block_ids, dtype=torch.int64))

    def prefill_attention(self, layer: int, q: torch.Tensor, blocks: torch.Tensor, end: int) -> torch.Tensor:
        raise RuntimeError("an offloaded KV pool keeps no prefix on the device: its sequences prefill whole, "
                           "layer by layer (ModelRunner.prefill_layer_major)")
