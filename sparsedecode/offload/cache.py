"""The paged KV pool in host memory, for contexts larger than the GPU (`LLM(..., kv_offload="cpu")`).

`OffloadedKVPool` keeps every block's V (and K, unless the index runs on the GPU) in pinned host memory,
in the on-device pool's layout `[layers, num_blocks, kv_heads, block_size, head_dim]`: a host block is
addressed by the physical block id of the block tables. Offload-aware methods (`supports_kv_offload =
True`: lfps, lychee+lfps) reach it only through the pool interface (`attention`, `index`, `reserve`,
`prefetch`), which this pool implements over a staging pool on the GPU.

Staging pool: per (layer, decode slot, KV head) `pool_blocks` slots of one block. The last slot holds
the row's newest block: it is fetched when the sequence reaches that block, and every later `store`
into the block writes it there as well as into host memory. The other slots cache complete blocks
(LRU), so a selection that changes slowly from step to step moves only its new blocks over the host
link. A cached copy is used while its host block has not been written since (a per-block write count),
so a freed block handed to another sequence is fetched anew. The staging pool grows to the decode
batch's rows on first use.

Attention over a list of blocks runs the fused op over the staging pool: the list becomes a list of
slots in block order, and the staged length of a row is cut right after the newest block's last token,
which masks the rest of that slot. A list longer than the staging pool (a full row: a refresh) streams
through it in chunks whose results are merged by log-sum-exp. The blocks of one chunk are resident
together: placing a missing block evicts only a block that the chunk does not read.

Copies: blocks are gathered from host memory into one of two pinned buffers and sent by non-blocking
copies on a side stream; the compute stream waits for them only when it attends (or writes a staged
slot), and the side stream waits for the last op that read a layer's slots before overwriting them.
Methods call `prefetch` for the next layer's predicted blocks so that those copies overlap with compute.

The index (`index`: exact block scores without an attention output) runs over the keys in host memory
on the CPU (`OffloadConfig.index = "cpu"`), or on the GPU ("gpu"), where the keys then live in the
on-device pool's layout: only the values stay in host memory and cross the host link, and staged keys
are gathered on the device. That splits the K/V between the two memories, so a context that fits
neither alone decodes from both together (docs/results.md, KV offload).

Prefill: the pool sets `layer_major_prefill`, so the engine prefills a sequence whole, one layer at a
time (`ModelRunner.prefill_layer_major`): each layer's K/V cross the host link once, and the device never
holds every layer's prefix. `gather` (a chunk's prefix on the device) is refused. Decode steps read block
tables, lengths and lists on the host: they run eagerly, never in a CUDA graph.

Parity: with the GPU index, the scores and the (one-chunk) staged attention are the on-device op's
bits, so offloaded decoding gives the on-device tokens. The CPU index rounds differently, which can
flip a near-tie in a top-k (random weights have many).
On a CPU device, host and device are the same memory: no pinning and no streams (a mode for tests).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core import DecodeBatch, KVPool
from ..kernels import sparse_decode_attention
from .scoring import block_lse, torch_threads

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


def offload_pool_blocks(config: OffloadConfig, wanted: int, block_bytes: int, device: torch.device,
                        gpu_memory_utilization: float) -> int:
    """Blocks of an offloaded pool on a GPU when none are given: `wanted`, or fewer where
    HOST_MEMORY_FRACTION of the host's available memory does not hold their host part (V, and K with the
    CPU index) or, with the GPU index, `gpu_memory_utilization` of the GPU's free memory does not hold
    their keys. `block_bytes`: K and V of one block, all layers."""
    part = block_bytes // 2
    keys_on_device = config.index == "gpu"
    host_budget = int(available_host_bytes() * HOST_MEMORY_FRACTION)
    blocks = min(wanted, host_budget // (part if keys_on_device else block_bytes))
    if keys_on_device:
        free, _ = torch.cuda.mem_get_info(device)
        blocks = min(blocks, int(free * gpu_memory_utilization) // part)
    if blocks < 2:
        raise RuntimeError(f"no memory left for an offloaded KV pool ({host_budget / 2**30:.1f} GiB of host memory "
                           "available): free some, or give num_blocks")
    return blocks


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A host tensor of exactly this size. Pinned: page-locked in place (PyTorch's pinned allocator rounds
    every request up to a power of two, which would double a 65 GB pool) and not cleared (clearing 100+ GB
    takes long; the kernels mask what lies past a sequence's length). Otherwise zeros: a CPU device's
    reference path multiplies masked positions by probability 0, and 0 * NaN is NaN."""
    if not pinned:
        return torch.zeros(shape, dtype=dtype)
    tensor = torch.empty(shape, dtype=dtype)
    nbytes, cudart = tensor.numel() * tensor.element_size(), torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 1))  # 1: cudaHostRegisterPortable
    if error:
        raise RuntimeError(f"could not page-lock {nbytes / 2**30:.1f} GiB of host memory for the offloaded "
                           f"KV pool (CUDA error {error}): too little host memory for this pool? Give num_blocks")
    weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())
    return tensor


def consecutive_runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index ranges of `ids` whose values go up by one."""
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    bounds = [0, *breaks.tolist(), len(ids)]
    return list(pairwise(bounds))


#: per row of a step, its newest block (logical index, -1 when no head reads it) and per KV head the
#: other blocks it reads (logical, ascending) and whether it reads the newest
Visits = list[tuple[int, list[tuple[np.ndarray, bool]]]]


class OffloadedKVPool(KVPool):
    prefetches = True
    layer_major_prefill = True

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, *, config: OffloadConfig) -> None:
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
        self.host_written: torch.cuda.Event | None = None  # after the last non-blocking copy into host memory
        # Writes per (layer, block): a staged copy is current while the count is the one it was fetched at.
        self.writes = np.zeros((num_layers, num_blocks), dtype=np.int64)
        self.pool_blocks = 0
        self.rows = 0

    @property
    def keys_on_device(self) -> bool:
        """Whether K lives on the compute device (index "gpu") rather than in host memory."""
        return self.config.index == "gpu"

    @property
    def device(self) -> torch.device:
        return self.compute_device

    def host_nbytes(self) -> int:
        """Bytes of the pool in host memory (V, and K unless it lives on the device)."""
        return self.nbytes() // 2 * (1 if self.keys_on_device else 2)

    def staging_nbytes(self) -> int:
        return 2 * self.k_staged.numel() * self.k_staged.element_size() if self.rows else 0

    # -- the staging pool ---------------------------------------------------------------------------
    def reserve(self, blocks_per_row: int) -> None:
        """Size the staging pool for `blocks_per_row` slots per row (newest included), or
        `config.pool_blocks` when set."""
        slots = max(2, min(self.config.pool_blocks or blocks_per_row, self.num_blocks - 1))
        if slots != self.pool_blocks:
            self.pool_blocks = slots
            self._stage(0)

    def _stage(self, rows: int) -> None:
        """(Re)allocate the staging pool for `rows` decode slots; nothing staged is kept."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy into the old slots is in flight
        self.rows = rows
        layers, heads, slots = self.num_layers, self.num_kv_heads, self.pool_blocks
        shape = (layers, rows, heads, slots * self.block_size, self.head_dim)
        self.k_staged = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_staged = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.held = np.full((layers, rows, heads, slots - 1), -1, dtype=np.int64)  # physical block per LRU slot
        self.held_writes = np.zeros_like(self.held)  # its write count when fetched
        self.last_use = np.full_like(self.held, -1)
        self.newest = np.full((layers, rows), -1, dtype=np.int64)  # physical block in the row's last slots
        self.tick = 0
        self.slots_read: list[torch.cuda.Event | None] = [None] * layers
        if self.copy_stream is not None:
            width, parts = self.block_size * self.head_dim, 1 if self.keys_on_device else 2
            self.pinned = [
                ([torch.empty(rows * heads * slots, width, dtype=self.dtype, pin_memory=True) for _ in range(parts)],
                 torch.cuda.Event())
                for _ in range(2)
            ]
            self.turn = 0

    def _rows_for(self, batch: DecodeBatch) -> None:
        if not self.pool_blocks:
            raise RuntimeError("the offloaded KV pool has no staging pool: the method must `reserve` one in plan()")
        if batch.size > self.rows:
            self._stage(batch.size)

    def _host_ready(self) -> None:
        """Wait for the non-blocking copies into host memory before reading or writing it there."""
        if self.host_written is not None:
            self.host_written.synchronize()
            self.host_written = None

    def _mark_read(self, layer: int) -> None:
        """The compute stream's work so far touched layer `layer`'s slots: copies into them wait for it."""
        if self.copy_stream is not None:
            self.slots_read[layer] = torch.cuda.Event()
            self.slots_read[layer].record()

    def _fetch(self, layer: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy host blocks (flat (block, head) rows) into staged slots (flat (row, head, slot) rows) of a layer."""
        width = self.block_size * self.head_dim
        src_ids, dst_ids = torch.from_numpy(src), torch.from_numpy(dst)
        parts = ((self.k[layer].view(-1, width), self.k_staged[layer].view(-1, width)),
                 (self.v[layer].view(-1, width), self.v_staged[layer].view(-1, width)))
        if self.copy_stream is None:
            for source, staged in parts:
                staged.index_copy_(0, dst_ids, source.index_select(0, src_ids))
            return
        self._host_ready()
        host_parts = [(source, staged) for source, staged in parts if not source.is_cuda]
        if self.keys_on_device:  # gathered on the device, in order with the stores that wrote the keys
            source, staged = parts[0]
            staged.index_copy_(0, dst_ids.to(self.device), source.index_select(0, src_ids.to(self.device)))
        buffers, copied = self.pinned[self.turn]
        self.turn ^= 1
        copied.synchronize()  # the buffer's previous copy has left it
        n = len(src)
        for (source, _), buffer in zip(host_parts, buffers):
            torch.index_select(source, 0, src_ids, out=buffer[:n])
        with torch.cuda.stream(self.copy_stream):
            if self.slots_read[layer] is not None:
                self.copy_stream.wait_event(self.slots_read[layer])
            dst_device = dst_ids.to(self.device, non_blocking=True)
            for (_, staged), buffer in zip(host_parts, buffers):
                staged.index_copy_(0, dst_device, buffer[:n].to(self.device, non_blocking=True))
            copied.record(self.copy_stream)

    def _place(self, layer: int, b: int, h: int, blocks: np.ndarray, src: list, dst: list) -> np.ndarray:
        """Slots of the physical `blocks` (at most pool_blocks - 1) in row (b, h)'s LRU slots, evicting the
        least recently used other blocks for the missing ones, whose copies are appended to src/dst."""
        held, held_writes, last_use = self.held[layer, b, h], self.held_writes[layer, b, h], self.last_use[layer, b, h]
        current = (held >= 0) & (held_writes == self.writes[layer, held])
        keys = np.where(current, held, -1)
        order = np.argsort(keys, kind="stable")
        slots = order[np.minimum(np.searchsorted(keys[order], blocks), len(keys) - 1)]
        missing = keys[slots] != blocks
        if missing.any():
            spare = np.ones(len(held), dtype=bool)
            spare[slots[~missing]] = False
            spare = np.flatnonzero(spare)
            victims = spare[np.argsort(np.where(current[spare], last_use[spare], -1), kind="stable")[: missing.sum()]]
            new = blocks[missing]
            held[victims] = new
            held_writes[victims] = self.writes[layer, new]
            slots[missing] = victims
            src.append(new * self.num_kv_heads + h)
            dst.append((b * self.num_kv_heads + h) * self.pool_blocks + victims)
        last_use[slots] = self.tick
        return slots

    def _visits(self, batch: DecodeBatch, unit_lists: torch.Tensor | None, unit_counts: torch.Tensor | None,
                full_rows: torch.Tensor | None) -> tuple[np.ndarray, Visits]:
        """The batch's block tables on the host, and what each row reads (see `Visits`)."""
        tables = batch.block_tables.cpu().numpy().astype(np.int64)
        held = -(-batch.seq_lens.cpu().numpy().astype(np.int64) // self.block_size)
        lists = unit_lists.cpu().numpy() if unit_lists is not None else None
        counts = unit_counts.cpu().numpy() if unit_lists is not None else None
        full = full_rows.cpu().numpy() if full_rows is not None else None
        visits: Visits = []
        for b in range(batch.size):
            newest, row = held[b] - 1, []
            for h in range(self.num_kv_heads):
                if lists is None or (full is not None and full[b, h]):
                    blocks = np.arange(held[b])
                else:
                    blocks = lists[b, h, : counts[b, h]].astype(np.int64)
                    blocks = np.unique(blocks[(blocks >= 0) & (blocks < held[b])])
                row.append((blocks[blocks < newest], bool(len(blocks)) and blocks[-1] == newest))
            visits.append((newest if any(sees for _, sees in row) else -1, row))
        return tables, visits

    def _stage_chunk(self, layer: int, tables: np.ndarray, visits: Visits,
                     chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bring chunk `chunk` of every row's visits into layer `layer`'s slots. Returns the op's slot lists
        and counts, and per slot the logical block it holds for this chunk ([B, H, P], [B, H], [B, H, P];
        padding: P and the tables' width)."""
        heads, slots_per_row = self.num_kv_heads, self.pool_blocks
        per_chunk = slots_per_row - 1
        slot_lists = np.full((len(visits), heads, slots_per_row), slots_per_row, dtype=np.int32)
        slot_blocks = np.full((len(visits), heads, slots_per_row), tables.shape[1], dtype=np.int64)
        counts = np.zeros((len(visits), heads), dtype=np.int32)
        src, dst = [], []
        self.tick += 1
        every_head = np.arange(heads)
        for b, (newest, row) in enumerate(visits):
            if chunk == 0 and newest >= 0 and self.newest[layer, b] != tables[b, newest]:
                self.newest[layer, b] = tables[b, newest]
                src.append(tables[b, newest] * heads + every_head)
                dst.append((b * heads + every_head) * slots_per_row + per_chunk)
            for h, (others, sees_newest) in enumerate(row):
                part = others[chunk * per_chunk : (chunk + 1) * per_chunk]
                n = len(part)
                slots = self._place(layer, b, h, tables[b, part], src, dst)
                slot_lists[b, h, :n] = slots
                slot_blocks[b, h, slots] = part
                if chunk == 0 and sees_newest:
                    slot_lists[b, h, n], slot_blocks[b, h, per_chunk] = per_chunk, newest
                    n += 1
                counts[b, h] = n
        if src:
            self._fetch(layer, np.concatenate(src), np.concatenate(dst))
        return torch.from_numpy(slot_lists), torch.from_numpy(counts), torch.from_numpy(slot_blocks)

    # -- what methods call ----------------------------------------------------------------------------
    def prefetch(self, layer: int, batch: DecodeBatch, unit_lists: torch.Tensor, unit_counts: torch.Tensor) -> None:
        """Start copying the blocks of these lists (their first chunk) into layer `layer`'s slots."""
        self._rows_for(batch)
        self._stage_chunk(layer, *self._visits(batch, unit_lists, unit_counts, None), 0)

    def attention(self, layer: int, q: torch.Tensor, batch: DecodeBatch, scale: float, unit_size: int = 64,
                  unit_lists: torch.Tensor | None = None, unit_counts: torch.Tensor | None = None,
                  full_rows: torch.Tensor | None = None, unit_lse: torch.Tensor | None = None,
                  sorted_lists: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`KVPool.attention` over the staged blocks: the same arguments and results (the slots are listed
        in block order whatever `sorted_lists` says)."""
        self._check_unit(unit_size)
        self._rows_for(batch)
        size, bs, per_chunk = batch.size, self.block_size, self.pool_blocks - 1
        tables, visits = self._visits(batch, unit_lists, unit_counts, full_rows)
        chunks = max([1, *(-(-len(others) // per_chunk) for _, row in visits for others, _ in row)])
        staged_lens = (per_chunk * bs + (batch.seq_lens.long() - 1) % bs + 1).to(torch.int32)
        if unit_lse is not None:
            unit_lse.fill_(float("-inf"))
        outs, lses = [], []
        for chunk in range(chunks):
            slot_lists, counts, slot_blocks = self._stage_chunk(layer, tables, visits, chunk)
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            slot_lse = None
            if unit_lse is not None:
                slot_lse = torch.empty(size, q.shape[1], self.pool_blocks, dtype=torch.float32, device=self.device)
            # The slots are listed in block order and read as given: the op visits the blocks in the
            # order it visits them in the on-device pool, so a one-chunk call gives that call's bits.
            out, lse = sparse_decode_attention(
                q, self.k_staged[layer, :size], self.v_staged[layer, :size], staged_lens, scale, bs,
                slot_lists.to(self.device), counts.to(self.device), None, slot_lse, sorted_lists=True,
            )
            self._mark_read(layer)
            if unit_lse is not None:
                self._scatter_scores(unit_lse, slot_lse, slot_blocks.to(self.device))
            outs.append(out)
            lses.append(lse)
        if chunks == 1:
            return outs[0], lses[0]
        lse = torch.stack(lses).logsumexp(0)
        weights = torch.exp(torch.stack(lses) - lse).nan_to_num(0.0)
        out = (torch.stack(outs).float() * weights[..., None]).sum(0)
        return out.to(q.dtype), lse

    def _scatter_scores(self, unit_lse: torch.Tensor, slot_lse: torch.Tensor, slot_blocks: torch.Tensor) -> None:
        """Move per-slot scores [B, Hq, P] to their blocks in unit_lse [B, Hq, NB] (one spare column
        takes the padding)."""
        batch, num_heads, num_blocks = unit_lse.shape
        target = slot_blocks.clamp(max=num_blocks).repeat_interleave(num_heads // self.num_kv_heads, dim=1)
        spread = torch.full((batch, num_heads, num_blocks + 1), float("-inf"), device=unit_lse.device)
        spread.scatter_(2, target, slot_lse)
        torch.maximum(unit_lse, spread[..., :num_blocks], out=unit_lse)

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
        self._host_ready()
        host = torch.device("cpu")
        scores = torch.empty(unit_lse.shape, dtype=torch.float32)
        with torch_threads(self.config.cpu_threads):
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
        """Write token i's k[i], v[i] at (block_ids[i], offsets[i]) of `layer`: into host memory (K into the
        device with the GPU index), and into the last slots of the rows whose newest block that is."""
        layer = int(layer)
        self._host_ready()
        ids, offs = block_ids.cpu().long(), offsets.cpu().long()
        if self.keys_on_device:
            self.k[layer, block_ids, :, offsets] = k
        else:
            self._write_host(self.k[layer], ids, offs, k)
        self._write_host(self.v[layer], ids, offs, v)
        self.writes[layer, ids.numpy()] += 1
        self._write_newest(layer, ids.numpy(), offs, k, v)

    def _write_host(self, pool: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> None:
        """Store tokens x [n, kv_heads, head_dim] into one layer's host blocks [num_blocks, kv_heads,
        block_size, head_dim]. Whole blocks from their first token on (a layer-major prefill) go as
        block-contiguous non-blocking copies (the last block padded with zeros); other tokens one by one."""
        n, bs = len(ids), self.block_size
        firsts = ids[::bs]
        whole_blocks = (torch.equal(offsets, torch.arange(n) % bs)
                        and torch.equal(ids, firsts.repeat_interleave(bs)[:n]))
        if not whole_blocks:
            pool[ids, :, offsets] = x.to(pool.device)
            return
        blocks = F.pad(x, (0, 0, 0, 0, 0, len(firsts) * bs - n)).unflatten(0, (-1, bs)).transpose(1, 2).contiguous()
        firsts = firsts.numpy()
        for start, stop in consecutive_runs(firsts):
            pool[firsts[start] : firsts[start] + stop - start].copy_(blocks[start:stop], non_blocking=True)
        if x.is_cuda:
            self.host_written = torch.cuda.Event()
            self.host_written.record()

    def _write_newest(self, layer: int, ids: np.ndarray, offsets: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        """Mirror stored tokens into the last slots that hold their block, which so stay equal to it."""
        if not self.rows:
            return
        newest = self.newest[layer]
        rows = np.flatnonzero(np.isin(newest, ids))
        if not len(rows):
            return
        pairs, tokens = np.nonzero(newest[rows][:, None] == ids[None, :])
        places = torch.from_numpy(rows[pairs]).to(self.device)
        tokens = torch.from_numpy(tokens)
        positions = ((self.pool_blocks - 1) * self.block_size + offsets[tokens]).to(self.device)
        tokens = tokens.to(self.device)
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)  # a fetch into these slots
        self.k_staged[layer, places, :, positions] = k[tokens]
        self.v_staged[layer, places, :, positions] = v[tokens]
        self._mark_read(layer)

    def gather(self, layer: int, blocks: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("an offloaded KV pool keeps no prefix on the device: its sequences prefill whole, "
                           "layer by layer (ModelRunner.prefill_layer_major)")
