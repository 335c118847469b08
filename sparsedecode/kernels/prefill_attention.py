"""Prompt-chunk attention over the paged KV pool, read in place: one Triton launch for the chunks of one or
more requests.

Computes `reference.paged_prefill_attention_ref` (read its docstring for the op). A chunk behind a cached
prefix otherwise needs its sequence's keys gathered out of the pool and, for PyTorch's fused attention,
expanded to every query head: a copy of the whole prefix per layer, written and read again, and memory
that grows with the context. Here each program walks its sequence's block table and loads K/V blocks
where they are.

Grid (query tiles of all requests, KV heads). A program's BLOCK_M rows are (query, head) pairs: the
GROUP query heads of its KV head for BLOCK_M // GROUP consecutive queries, so each K/V block is loaded
once for the whole group. It runs an online softmax over the key blocks: first the blocks every query
of the tile sees whole, without a mask, then the blocks on its causal diagonal.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import triton
import triton.language as tl

from .reference import paged_prefill_attention_ref

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillLaunch:
    """Tile and warps of the prefill kernel; any values compute the same op (up to the order of float sums)."""

    block_m: int = 128  # rows per program: (query, query head) pairs, the query heads of one KV head
    num_warps: int = 4
    num_stages: int = 3


PREFILL_LAUNCH = PrefillLaunch()
#: for GPUs whose shared memory per block cannot hold PREFILL_LAUNCH's buffers (about 100 KB on sm_86 / sm_89)
SMALL_PREFILL_LAUNCH = PrefillLaunch(block_m=64, num_warps=4, num_stages=2)


def shared_memory_bytes(launch: PrefillLaunch, page: int, dim: int, element_size: int) -> int:
    """Shared memory a launch's tiles take, estimated: one buffer per pipelining stage of a K and a V block
    (float32 pools run at most 2 stages) and the query tile."""
    stages = launch.num_stages if element_size == 2 else min(launch.num_stages, 2)
    return (stages * 2 * page + launch.block_m) * dim * element_size


def default_launch(page: int, dim: int, element_size: int, shared_memory: int) -> PrefillLaunch:
    """PREFILL_LAUNCH where its tiles fit in `shared_memory` bytes per block, else SMALL_PREFILL_LAUNCH."""
    if shared_memory_bytes(PREFILL_LAUNCH, page, dim, element_size) <= shared_memory:
        return PREFILL_LAUNCH
    return SMALL_PREFILL_LAUNCH


@lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


@triton.jit
def _softmax_step(s, vt, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One key block into the online softmax: scores s [BLOCK_M, PAGE] (log2 units), values vt [PAGE, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(q, k_pool, v_pool, out, tables, tile_request, tile_first, query_starts, context_lens,
                    s_qn, s_qh, s_on, s_oh, s_pb, s_ph, s_pt, s_tr, scale_log2,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, PAGE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    t = tl.program_id(0)
    kv_head = tl.program_id(1)
    r = tl.load(tile_request + t)
    first = tl.load(tile_first + t)
    q0 = tl.load(query_starts + r)
    rows = tl.load(query_starts + r + 1) - q0
    length = tl.load(context_lens + r)
    start = length - rows  # position of the chunk's first query
    i = tl.arange(0, BLOCK_M)
    m = first + i // GROUP  # the row's query in the chunk
    head = kv_head * GROUP + i % GROUP  # and its query head
    live = (m < rows) & (i < (BLOCK_M // GROUP) * GROUP)
    pos = start + m
    d = tl.arange(0, D)
    q_rows = (q0 + m).to(tl.int64) * s_qn + head * s_qh
    qt = tl.load(q + q_rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
    kv_base = kv_head.to(tl.int64) * s_ph
    slot = tl.arange(0, PAGE)
    table = tables + r.to(tl.int64) * s_tr
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    whole = (start + first) // PAGE  # blocks below this are visible to every query of the tile
    last = tl.minimum(start + first + BLOCK_M // GROUP, length)  # keys the tile needs: positions below this
    for j in range(0, whole):
        place = tl.load(table + j).to(tl.int64) * s_pb + kv_base + slot[:, None] * s_pt + d[None, :]
        s = tl.dot(qt, tl.trans(tl.load(k_pool + place)), input_precision=DOT_PRECISION) * scale_log2
        m_i, l_i, acc = _softmax_step(s, tl.load(v_pool + place), m_i, l_i, acc, DOT_PRECISION)
    for j in range(whole, tl.cdiv(last, PAGE)):
        keys = j * PAGE + slot
        place = tl.load(table + j).to(tl.int64) * s_pb + kv_base + slot[:, None] * s_pt + d[None, :]
        stored = (keys < length)[:, None]
        kt = tl.load(k_pool + place, mask=stored, other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
        vt = tl.load(v_pool + place, mask=stored, other=0.0)
        m_i, l_i, acc = _softmax_step(s, vt, m_i, l_i, acc, DOT_PRECISION)
    acc = acc / l_i[:, None]
    out_rows = (q0 + m).to(tl.int64) * s_on + head * s_oh
    tl.store(out + out_rows[:, None] + d[None, :], acc.to(out.dtype.element_ty), mask=live[:, None])


@lru_cache(maxsize=64)
def _tile_plan(query_starts: tuple[int, ...], context_lens: tuple[int, ...], per_tile: int,
               device: torch.device) -> tuple[torch.Tensor, ...]:
    """(tile request, tile first query, query starts, context lengths) on the device. Cached: the layers of a
    prefill step share them, so they cross to the device once, without waiting for it."""
    tiles = [(r, first) for r in range(len(context_lens))
             for first in range(0, query_starts[r + 1] - query_starts[r], per_tile)]
    host = torch.tensor([[r for r, _ in tiles], [f for _, f in tiles]], dtype=torch.int32)
    lengths = torch.tensor([list(query_starts), list(context_lens) + [0]], dtype=torch.int32)
    if device.type == "cuda":
        host, lengths = host.pin_memory(), lengths.pin_memory()
    host, lengths = host.to(device, non_blocking=True), lengths.to(device, non_blocking=True)
    return host[0], host[1], lengths[0], lengths[1]


def paged_prefill_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: list[int],
    context_lens: list[int],
    scale: float | None = None,
    *,
    launch: PrefillLaunch | None = None,
    backend: Literal["auto", "triton", "reference"] = "auto",
) -> torch.Tensor:
    """The op of `reference.paged_prefill_attention_ref`: q [n, Hq, D] of R requests' prompt chunks (request
    r's at rows query_starts[r] .. query_starts[r + 1], host ints), one layer's pools [NB, Hkv, P, D] holding
    each request's keys up to context_lens[r] (host ints; the chunk's own keys stored already), block_tables
    [R, MB]. `scale` defaults to 1 / sqrt(D). Returns [n, Hq, D].

    backend "auto" runs one Triton launch on CUDA tensors and the reference on CPU ones; "triton" on CPU
    tensors needs TRITON_INTERPRET=1 (the tests). `launch` None: `default_launch` for the GPU's shared memory."""
    n, heads, dim = q.shape
    _, kv_heads, page, pool_dim = k_pool.shape
    requests = len(context_lens)
    if (v_pool.shape != k_pool.shape or pool_dim != dim or heads % kv_heads or block_tables.dim() != 2
            or block_tables.shape[0] != requests or len(query_starts) != requests + 1):
        raise ValueError(f"bad shapes q {tuple(q.shape)} pools {tuple(k_pool.shape)} / {tuple(v_pool.shape)} "
                         f"block_tables {tuple(block_tables.shape)}, {len(query_starts)} query starts for "
                         f"{requests} context lengths")
    if query_starts[0] != 0 or query_starts[-1] != n:
        raise ValueError(f"query_starts must run from 0 to the {n} rows of q, "
                         f"not {query_starts[0]} .. {query_starts[-1]}")
    for r, length in enumerate(context_lens):
        rows = query_starts[r + 1] - query_starts[r]
        if rows < 1 or length < rows or length > block_tables.shape[1] * page:
            raise ValueError(f"request {r}: {rows} queries and {length} keys (at most {block_tables.shape[1] * page} "
                             "in its block table) do not make a prompt chunk behind its prefix")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "reference":
        return paged_prefill_attention_ref(q, k_pool, v_pool, block_tables, query_starts, context_lens, scale)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 before importing triton")
    if k_pool.stride() != v_pool.stride() or k_pool.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the pools need equal strides; pools and q a contiguous last dimension")
    if page < 16 or dim < 16 or page & (page - 1) or dim & (dim - 1):
        raise ValueError("the kernel takes power-of-two block sizes and head dims of at least 16, "
                         f"not {page} and {dim}")
    if launch is None:
        launch = (default_launch(page, dim, q.element_size(), _device_shared_memory(q.device.index))
                  if q.is_cuda else PREFILL_LAUNCH)
    if launch.block_m < 16 or launch.block_m & (launch.block_m - 1):
        raise ValueError(f"PrefillLaunch.block_m must be a power of two of at least 16, not {launch.block_m}")
    group = heads // kv_heads
    block_m = max(launch.block_m, triton.next_power_of_2(group))  # rows: (query, head) pairs of one KV head
    per_tile = block_m // group  # queries per program
    tile_request, tile_first, starts, lengths = _tile_plan(tuple(query_starts), tuple(context_lens), per_tile,
                                                           q.device)
    out = torch.empty_like(q)
    _, s_ph, s_pt, _ = k_pool.stride()
    two_byte = q.element_size() == 2
    _prefill_kernel[(tile_request.numel(), kv_heads)](
        q, k_pool, v_pool, out, block_tables, tile_request, tile_first, starts, lengths,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_pool.stride(0), s_ph, s_pt,
        block_tables.stride(0), scale * LOG2E,
        GROUP=group, D=dim, BLOCK_M=block_m, PAGE=page, DOT_PRECISION="tf32" if two_byte else "ieee",
        num_warps=launch.num_warps, num_stages=launch.num_stages if two_byte else min(launch.num_stages, 2))
    return out
