"""An offloaded KV cache: every token's V (and K, unless the index is on the GPU) in pinned host memory,
a fixed pool of blocks on the GPU.

Pool: per (layer, sequence, KV head) `pool_blocks` slots of `block_size` tokens. The last slot holds the
sequence's newest block, which decode steps write into directly; the other slots cache complete blocks
(LRU), so a selection that changes slowly from step to step moves only its new blocks over PCIe.
Attention over a list of blocks runs the fused op over the pool: the list becomes a list of slots, and
the pool's length per sequence is cut right after the newest block's last token, which masks the rest
of that slot. A list longer than the pool (a full row: a refresh) streams through it in chunks whose
results are merged by log-sum-exp.

Copies: blocks are gathered from host memory into one of two pinned staging buffers and sent by
non-blocking copies on a side stream; the compute stream waits for them only when it attends, and the
side stream waits for the last op that read a layer's pool before overwriting its slots. Methods call
`prefetch` for the next layer's predicted blocks so that those copies overlap with compute.

The index (`index`: exact block scores without an attention output) runs over the keys in host memory
on the CPU (`OffloadConfig.index = "cpu"`), or on the GPU ("gpu"), where the keys then live: only the
values stay in host memory and cross PCIe, and pool keys are gathered on the device. That splits the
cache between the two memories: 1M tokens of the Llama-3.1-8B shape (128 GiB of K/V) decode on one H200
with 125 GiB of host memory, neither of which holds them alone (docs/results.md, KV offload).

Parity: with the GPU index, the scores and the (one-chunk) pool attention are the on-device op's bits,
so offloaded decoding gives the on-device tokens. The CPU index rounds differently, which can flip a
near-tie in a top-k (random weights have many).
On a CPU device, host and device are the same memory: no pinning and no streams (a mode for tests).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.kv_cache import KVCache
from ..kernels import sparse_decode_attention
from .scoring import block_lse, torch_threads

INDEX_SIDES = ("cpu", "gpu")


@dataclass(frozen=True)
class OffloadConfig:
    """Options of `kv_offload="cpu"`; pass an instance as `kv_offload` to change them."""

    # where index-only scoring runs: "cpu" over the keys in host memory; "gpu" over the keys, which then
    # live on the GPU (half the cache's bytes there; only values in host memory and over PCIe)
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


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A host tensor of exactly this size, page-locked in place when `pinned`: PyTorch's pinned allocator
    rounds every request up to a power of two, which would double a 65 GB cache."""
    tensor = torch.empty(shape, dtype=dtype)
    if pinned:
        nbytes, cudart = tensor.numel() * tensor.element_size(), torch.cuda.cudart()
        error = int(cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 1))  # 1: cudaHostRegisterPortable
        if error:
            raise RuntimeError(f"could not page-lock {nbytes / 2**30:.1f} GiB of host memory for the offloaded "
                               f"KV cache (CUDA error {error}): too little host memory for this context?")
        weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())
    return tensor


class OffloadedKVCache(KVCache):
    writable_on_device = False  # K/V live in host memory (and a GPU pool): `append` stores both
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        config: OffloadConfig,
    ) -> None:
        self.compute_device = torch.device(device)
        self.config = config
        super().__init__(num_layers, batch_size, num_kv_heads, capacity, head_dim, block_size, dtype, device)
        on_gpu = self.compute_device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.compute_device) if on_gpu else None
        self.pool_blocks = 0

    @property
    def keys_on_device(self) -> bool:
        """Whether K lives on the compute device (index "gpu") rather than in host memory."""
        return self.config.index == "gpu"

    def storage(self, part: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
                ) -> torch.Tensor:
        # Not cleared (clearing 100+ GB takes long): nothing past a sequence's length is used unmasked.
        if part == "k" and self.keys_on_device:
            return torch.empty(shape, dtype=dtype, device=device)
        return host_tensor(shape, dtype, self.compute_device.type == "cuda")  # pinned when a GPU computes

    @property
    def device(self) -> torch.device:
        return self.compute_device

    def host_nbytes(self) -> int:
        """Bytes of the cache in host memory (V, and K unless it lives on the device)."""
        return self.nbytes() // 2 * (1 if self.keys_on_device else 2)

    def pool_nbytes(self) -> int:
        return 2 * self.k_pool.numel() * self.k_pool.element_size() if self.pool_blocks else 0

    # -- the pool ---------------------------------------------------------------------------------
    def reserve(self, blocks: int) -> None:
        """Size the pool for `blocks` slots per row (newest included), or `config.pool_blocks` when set."""
        slots = max(2, min(self.config.pool_blocks or blocks, self.num_blocks))
        if slots == self.pool_blocks:
            return
        self.pool_blocks = slots
        layers, batch, heads = self.num_layers, self.batch_size, self.num_kv_heads
        shape = (layers, batch, heads, slots * self.block_size, self.head_dim)
        self.k_pool = torch.zeros(shape, dtype=self.k.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=self.k.dtype, device=self.device)
        self.slot_of = np.full((layers, batch, heads, self.num_blocks), -1, dtype=np.int64)
        self.block_at = np.full((layers, batch, heads, slots - 1), -1, dtype=np.int64)
        self.last_use = np.full((layers, batch, heads, slots - 1), -1, dtype=np.int64)
        self.tick = 0
        self.pool_read: list[torch.cuda.Event | None] = [None] * layers
        if self.copy_stream is not None:
            rows = batch * heads * (slots - 1)  # the most blocks one fetch moves
            width = self.block_size * self.head_dim
            host_parts = 1 if self.keys_on_device else 2
            self.staging = [
                ([torch.empty(rows, width, dtype=self.k.dtype, pin_memory=True) for _ in range(host_parts)],
                 torch.cuda.Event())
                for _ in range(2)
            ]
            self.turn = 0

    def _fetch(self, layer: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy host blocks (flat row-block ids) into pool slots (flat row-slot ids) of one layer."""
        if not len(src):
            return
        width = self.block_size * self.head_dim
        src_ids, dst_ids = torch.from_numpy(src), torch.from_numpy(dst)
        pairs = ((self.k[layer].view(-1, width), self.k_pool[layer].view(-1, width)),
                 (self.v[layer].view(-1, width), self.v_pool[layer].view(-1, width)))
        if self.copy_stream is None:
            for source, pool in pairs:
                pool.index_copy_(0, dst_ids, source.index_select(0, src_ids))
            return
        stages, copied = self.staging[self.turn]
        self.turn ^= 1
        copied.synchronize()  # the buffer's previous copy has left it
        n = len(src)
        device_pairs = [(source, pool) for source, pool in pairs if source.is_cuda]  # keys kept on the device
        host_pairs = [(source, pool) for source, pool in pairs if not source.is_cuda]
        for (source, _), stage in zip(host_pairs, stages):
            torch.index_select(source, 0, src_ids, out=stage[:n])
        with torch.cuda.stream(self.copy_stream):
            if self.pool_read[layer] is not None:
                self.copy_stream.wait_event(self.pool_read[layer])
            dst_dev = dst_ids.to(self.device, non_blocking=True)
            if device_pairs:  # gathered on the device: nothing crosses PCIe
                src_dev = src_ids.to(self.device, non_blocking=True)
                for source, pool in device_pairs:
                    pool.index_copy_(0, dst_dev, source.index_select(0, src_dev))
            for (_, pool), stage in zip(host_pairs, stages):
                pool.index_copy_(0, dst_dev, stage[:n].to(self.device, non_blocking=True))
            copied.record(self.copy_stream)

    def _place(self, layer: int, b: int, h: int, blocks: np.ndarray, src: list, dst: list) -> np.ndarray:
        """Slots of `blocks` (at most pool_blocks - 1) in row (b, h)'s pool, evicting the least recently
        used other blocks for the missing ones, whose copies are appended to src/dst."""
        slot_of, block_at, last_use = self.slot_of[layer, b, h], self.block_at[layer, b, h], self.last_use[layer, b, h]
        slots = slot_of[blocks]
        missing = slots < 0
        if missing.any():
            spare = np.ones(len(block_at), dtype=bool)
            spare[slots[~missing]] = False
            spare = np.flatnonzero(spare)
            victims = spare[np.argsort(last_use[spare], kind="stable")[: missing.sum()]]
            evicted = block_at[victims]
            slot_of[evicted[evicted >= 0]] = -1
            new = blocks[missing]
            block_at[victims] = new
            slot_of[new] = victims
            slots[missing] = victims
            row = b * self.num_kv_heads + h
            src.append(row * self.num_blocks + new)
            dst.append(row * self.pool_blocks + victims)
        last_use[slots] = self.tick
        return slots

    def _visits(self, lens: torch.Tensor, unit_lists, unit_counts, full_rows) -> list[list[tuple[np.ndarray, int]]]:
        """Per row: (the visited blocks other than the newest, ascending; the newest block or -1)."""
        held = ((lens.long() + self.block_size - 1) // self.block_size).tolist()
        lists = unit_lists.cpu().numpy() if unit_lists is not None else None
        counts = unit_counts.cpu().numpy() if unit_lists is not None else None
        full = full_rows.cpu().numpy() if full_rows is not None else None
        visits = []
        for b in range(self.batch_size):
            newest, row_visits = held[b] - 1, []
            for h in range(self.num_kv_heads):
                if lists is None or (full is not None and full[b, h]):
                    blocks = np.arange(held[b])
                else:
                    blocks = lists[b, h, : counts[b, h]].astype(np.int64)
                    blocks = np.unique(blocks[(blocks >= 0) & (blocks < held[b])])
                seen = bool(len(blocks)) and blocks[-1] == newest
                row_visits.append((blocks[blocks < newest], newest if seen else -1))
            visits.append(row_visits)
        return visits

    def _stage_chunk(self, layer: int, visits, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bring chunk `chunk` of every row's visits into the pool. Returns the op's slot lists and counts,
        and per slot the block it holds for this chunk ([B, H, P], [B, H], [B, H, P]; padding: P and
        num_blocks)."""
        batch, heads, slots_per_row = self.batch_size, self.num_kv_heads, self.pool_blocks
        per_chunk = slots_per_row - 1
        slot_lists = np.full((batch, heads, slots_per_row), slots_per_row, dtype=np.int32)
        slot_blocks = np.full((batch, heads, slots_per_row), self.num_blocks, dtype=np.int64)
        counts = np.zeros((batch, heads), dtype=np.int32)
        src, dst = [], []
        self.tick += 1
        for b in range(batch):
            for h in range(heads):
                others, newest = visits[b][h]
                part = others[chunk * per_chunk : (chunk + 1) * per_chunk]
                n = len(part)
                slots = self._place(layer, b, h, part, src, dst)
                slot_lists[b, h, :n] = slots
                slot_blocks[b, h, slots] = part
                if chunk == 0 and newest >= 0:
                    slot_lists[b, h, n], slot_blocks[b, h, per_chunk] = per_chunk, newest
                    n += 1
                counts[b, h] = n
        if src:
            self._fetch(layer, np.concatenate(src), np.concatenate(dst))
        return torch.from_numpy(slot_lists), torch.from_numpy(counts), torch.from_numpy(slot_blocks)

    def prefetch(self, layer: int, seq_lens: torch.Tensor, unit_lists: torch.Tensor, unit_counts: torch.Tensor) -> None:
        """Start copying the blocks of these lists into layer `layer`'s pool (first chunk only)."""
        if self.config.prefetch:
            self._stage_chunk(layer, self._visits(seq_lens.cpu(), unit_lists, unit_counts, None), 0)

    # -- decode-attention over the pool ---------------------------------------------------------------
    def attention(self, layer: int, q: torch.Tensor, seq_lens: torch.Tensor, scale: float, unit_size: int = 64,
                  unit_lists: torch.Tensor | None = None, unit_counts: torch.Tensor | None = None,
                  full_rows: torch.Tensor | None = None, unit_lse: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """`sparse_decode_attention` over this cache's layer `layer` (same arguments and results)."""
        if unit_size != self.block_size:
            raise ValueError(f"an offloaded cache attends in its blocks of {self.block_size} tokens, not {unit_size}")
        bs, per_chunk = self.block_size, self.pool_blocks - 1
        visits = self._visits(seq_lens.cpu(), unit_lists, unit_counts, full_rows)
        chunks = max(1, max(-(-len(others) // per_chunk) for row in visits for others, _ in row))
        pool_lens = (per_chunk * bs + (seq_lens.long() - 1) % bs + 1).to(torch.int32)
        if unit_lse is not None:
            unit_lse.fill_(float("-inf"))
        outs, lses = [], []
        for chunk in range(chunks):
            slot_lists, counts, slot_blocks = self._stage_chunk(layer, visits, chunk)
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            slot_lse = None
            if unit_lse is not None:
                slot_lse = torch.empty(q.shape[0], q.shape[1], self.pool_blocks, dtype=torch.float32, device=self.device)
            # The slots are listed in block order and read as given: the op visits the blocks in the
            # order it visits them in an on-device cache, so a one-chunk call gives that call's bits.
            out, lse = sparse_decode_attention(
                q, self.k_pool[layer], self.v_pool[layer], pool_lens, scale, bs, slot_lists.to(self.device),
                counts.to(self.device), None, slot_lse, sorted_lists=True,
            )
            if self.copy_stream is not None:
                self.pool_read[layer] = torch.cuda.Event()
                self.pool_read[layer].record()
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
        target = slot_blocks.repeat_interleave(num_heads // self.num_kv_heads, dim=1)
        spread = torch.full((batch, num_heads, num_blocks + 1), float("-inf"), device=unit_lse.device)
        spread.scatter_(2, target, slot_lse)
        torch.maximum(unit_lse, spread[..., :num_blocks], out=unit_lse)

    def index(self, layer: int, q: torch.Tensor, seq_lens: torch.Tensor, scale: float, unit_size: int,
              unit_lists: torch.Tensor, unit_counts: torch.Tensor, full_rows: torch.Tensor | None,
              unit_lse: torch.Tensor) -> torch.Tensor:
        """Exact per-block scores of the visited blocks into unit_lse; returns lse [B, Hq]."""
        if self.keys_on_device:
            # The op an on-device cache scores with (its output, over K as values, is dropped): the same
            # scores to the bit, so offloaded decoding selects the same blocks even at near-ties.
            return sparse_decode_attention(q, self.k[layer], self.k[layer], seq_lens, scale, unit_size, unit_lists,
                                           unit_counts, full_rows, unit_lse, sorted_lists=True)[1]
        host = torch.device("cpu")
        scores = torch.empty(unit_lse.shape, dtype=torch.float32)
        with torch_threads(self.config.cpu_threads):
            lse = block_lse(q.to(host), self.k[layer], seq_lens.to(host), scale, unit_size, unit_lists.to(host),
                            unit_counts.to(host), None if full_rows is None else full_rows.to(host), scores)
        unit_lse.copy_(scores)
        return lse.to(self.device)

    # -- the KVCache hooks --------------------------------------------------------------------------
    def write(self, layer: int, batch_index: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one sequence's whole layer (k, v: [kv_heads, n, head_dim] on the device; layer-major
        prefill) on the current stream; its newest block also goes to the pool's last slot."""
        if start != 0:
            raise ValueError("an offloaded cache stores a whole layer of a sequence at once (start 0), not a chunk")
        if not self.pool_blocks:
            raise RuntimeError("the offloaded cache has no pool yet: the method must reserve one in plan()")
        n = k.shape[1]
        for h in range(self.num_kv_heads):  # per head the host rows are contiguous: a truly asynchronous copy
            self.k[layer, batch_index, h, :n].copy_(k[h], non_blocking=True)
            self.v[layer, batch_index, h, :n].copy_(v[h], non_blocking=True)
        self.slot_of[layer, batch_index] = -1
        self.block_at[layer, batch_index] = -1
        self.last_use[layer, batch_index] = -1
        first = (n - 1) // self.block_size * self.block_size
        tail = (self.pool_blocks - 1) * self.block_size
        self.k_pool[layer, batch_index, :, tail : tail + n - first] = k[:, first:]
        self.v_pool[layer, batch_index, :, tail : tail + n - first] = v[:, first:]

    def prefix(self, layer: int, batch_index: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("an offloaded cache keeps no prefix on the device: prefill it layer by layer "
                           "(sparsedecode.offload.prefill_layer_major)")

    def append(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one decoded token per sequence: in the cache (keys on the device when they live there) and
        in the pool's newest-block slot."""
        host_rows, host_positions = torch.arange(positions.shape[0]), positions.cpu()
        rows = host_rows.to(self.device)
        if self.keys_on_device:
            self.k[layer, rows, :, positions] = k
        else:
            self.k[layer, host_rows, :, host_positions] = k.cpu()
        self.v[layer, host_rows, :, host_positions] = v.cpu()
        slot = (self.pool_blocks - 1) * self.block_size + positions % self.block_size
        self.k_pool[layer, rows, :, slot] = k
        self.v_pool[layer, rows, :, slot] = v
