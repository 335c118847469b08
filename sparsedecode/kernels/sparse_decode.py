"""Fused Triton decode attention over full and unit-list rows: one hybrid, load-balanced kernel.

Computes exactly `reference.sparse_decode_attention_ref` (read its docstring for the op). A *row* is
one (sequence b, KV head h). A full row attends to every unit [0, ceil(len_b / U)); a list row to the
units of its list (entries < 0 or >= ceil(len_b / U) skipped, duplicates counted once). All query
heads of the GQA group are processed together, so every K/V tile is read from memory once per row.

Units, lists and lengths are logical (per sequence); K/V are read through a block table: token t of
sequence b at slot t % P of block block_tables[b, t // P] of a pool [NB, Hkv, P, D] (P a constexpr, so
the split is two shifts for the engine's power-of-two pages). A static cache [B, Hkv, T, D] is the
pool of B blocks with P = T and table arange(B)[:, None]: one code path for both layouts, in which the
layout only moves addresses, so a paged cache gives the bits of the static cache holding its tokens.

Up to three kernel launches, none of which syncs with the host (so a call can be captured in a CUDA
graph):

1. `_plan_kernel` (only with unit lists not promised sorted), one program per row: sorts the row's
   valid units ascending (invalid entries pushed past the end) and stores how many units it visits.
2. `_partial_kernel`, the work pool: each row's unit sequence is cut into chunks of C units; the
   (row, chunk) work items are numbered row-major and every program finds its own item from a prefix
   sum of the per-row chunk counts. C is computed on the device from the units the rows visit in
   this call (the actual lengths and lists, not the capacity): their total spread over about `items`
   work items (a few per SM), so a light hybrid call and a heavy dense one both fill the GPU
   evenly, without a tail wave and without more partials than needed. The grid is an upper bound
   that depends only on shapes (items + rows); surplus programs exit at once. A program writes an
   unnormalised partial (acc, running max, running sum) and, on request, the log-sum-exp of every
   unit it visits (same pass over K; `unit_lse` is filled with -inf before, for the units nobody
   visits). With `sorted_lists` the lists are read as given (no launch 1), and visited in their order.
3. `_merge_kernel`, one program per (sequence, query head): log-sum-exp merge of the row's partials
   in chunk order, writing out [B, Hq, D] and lse [B, Hq] (0 and -inf for a row without units).

Determinism: C depends only on how many units each row visits, and full rows and list rows share
one code path whose unit index is either the slot itself or the (sorted) list entry. A list row whose
list is the units 0..n-1 (in any order) therefore performs the very same operations as a full row of
n units and gives bit-identical results (the other rows being the same).

Scratch buffers are cached per (device, shapes) in `_SCRATCH` so that repeated calls (all layers,
all steps) reuse them; run one call before capturing a CUDA graph so they are allocated outside the
capture. Calls sharing a cache entry must be ordered on one stream (the usual decode loop).

Diagnostics: inside `record_attention_reads(callback)` every call first reports what it is about to
read (see there); every decode method reads the cache for its output through this op, so an observer
here sees all of them without per-method code.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, wait_then_launch_dependents
from .reference import check_scored_rows, gather_blocks, sparse_decode_attention_ref

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
# Sentinel unit index larger than any real one: invalid list entries sort behind the valid ones.
_INVALID = tl.constexpr(2**30)


@triton.jit
def _row_chunks(row_units, unit_counts, full_rows, seq_lens, R, HKV, T, K, ITEMS, C_FIXED,
                stride_cb, stride_ch, stride_fb, stride_fh, U: tl.constexpr, C_MIN: tl.constexpr,
                C_TILE: tl.constexpr, R_PAD: tl.constexpr, HAS_LIST: tl.constexpr, HAS_FULL: tl.constexpr,
                SORTED: tl.constexpr):
    """Per-row unit and chunk counts, the inclusive prefix sum of the chunk counts, and C, the units
    per chunk: C_FIXED if > 0, else the call's total units over ITEMS items, in whole tiles of C_TILE
    units and at least C_MIN. (Rounding up to whole C_MIN instead would leave far fewer items than
    ITEMS, and a second wave on a few SMs: on one 128K retrieval head and seven 4K lists, 156 items
    where 264 were asked.)"""
    rows = tl.arange(0, R_PAD)
    in_range = rows < R
    lens = tl.load(seq_lens + rows // HKV, mask=in_range, other=0).to(tl.int32)
    n = tl.cdiv(tl.minimum(tl.maximum(lens, 0), T), U)
    if HAS_LIST:
        if SORTED:  # the caller's lists are valid as given: the row visits its first `count` entries
            b = rows // HKV
            h = rows % HKV
            count = tl.load(unit_counts + b * stride_cb + h * stride_ch, mask=in_range, other=0)
            listed = tl.minimum(tl.maximum(count, 0), tl.minimum(n, K))
            if HAS_FULL:
                full = tl.load(full_rows + b * stride_fb + h * stride_fh, mask=in_range, other=0) != 0
                listed = tl.where(full, n, listed)
            n = listed
        else:
            n = tl.load(row_units + rows, mask=in_range, other=0)
    c = tl.maximum(tl.cdiv(tl.cdiv(tl.sum(n, 0), ITEMS), C_TILE) * C_TILE, C_MIN)
    if not HAS_LIST:  # a row of 4+ chunks in the nearest whole number of them: no short last chunk
        k = tl.maximum((n + c // 2) // c, 1)
        c = tl.where(n >= 4 * c, tl.maximum(tl.cdiv(tl.cdiv(n, k), C_TILE) * C_TILE, C_TILE), c)
    c = tl.where(C_FIXED > 0, C_FIXED, c)
    nc = tl.cdiv(n, c)
    return rows, n, nc, tl.cumsum(nc, 0), c


@triton.jit
def _plan_kernel(unit_lists, unit_counts, full_rows, seq_lens, row_units, sorted_units,
                 HKV, T, K,
                 stride_lb, stride_lh, stride_lk, stride_cb, stride_ch, stride_fb, stride_fh,
                 U: tl.constexpr, K_PAD: tl.constexpr, HAS_FULL: tl.constexpr, PDL: tl.constexpr):
    wait_then_launch_dependents(PDL)
    r = tl.program_id(0)
    b = r // HKV
    h = r % HKV
    seq_len = tl.minimum(tl.maximum(tl.load(seq_lens + b).to(tl.int32), 0), T)
    n_avail = tl.cdiv(seq_len, U)
    slot = tl.arange(0, K_PAD)
    count = tl.load(unit_counts + b * stride_cb + h * stride_ch)
    entry = tl.load(unit_lists + b * stride_lb + h * stride_lh + slot * stride_lk, mask=slot < K, other=-1)
    valid = (slot < count) & (entry >= 0) & (entry < n_avail)
    # Ascending order makes any permutation of 0..n-1 walk the units exactly like a full row, and
    # puts duplicates side by side so the partial kernel can skip them.
    keys = tl.where(valid, entry, _INVALID).to(tl.int32)
    tl.store(sorted_units + r * K_PAD + slot, tl.sort(keys))
    n = tl.sum(valid.to(tl.int32), 0)
    if HAS_FULL:
        n = tl.where(tl.load(full_rows + b * stride_fb + h * stride_fh) != 0, n_avail, n)
    tl.store(row_units + r, n)


@triton.jit
def _unit_at(list_row, slot, end, use_list, stride, HAS_LIST: tl.constexpr, SORTED: tl.constexpr):
    """Unit index held in `slot` of the row, -1 where the slot is past `end` or a duplicate."""
    in_chunk = slot < end
    unit = slot
    if HAS_LIST:
        from_list = in_chunk & use_list
        listed = tl.load(list_row + slot * stride, mask=from_list, other=-1)
        if not SORTED:
            prev = tl.load(list_row + slot - 1, mask=from_list & (slot > 0), other=-1)
            listed = tl.where(listed == prev, -1, listed)
        unit = tl.where(use_list, listed, slot)
    return tl.where(in_chunk, unit, -1)


@triton.jit
def _partial_kernel(q, k, v, block_tables, seq_lens, row_units, sorted_units, unit_lists, unit_counts, full_rows,
                    scored_rows, part_acc, part_m, part_l, unit_lse,
                    qk_scale, R, HKV, T, K, ITEMS, C_FIXED,
                    stride_qb, stride_qh, stride_tb, stride_tm,
                    stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt,
                    stride_lb, stride_lh, stride_lk, stride_cb, stride_ch,
                    stride_fb, stride_fh, stride_sb, stride_sh, stride_eb, stride_eh,
                    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, U: tl.constexpr, P: tl.constexpr,
                    BLOCK_N: tl.constexpr, C_MIN: tl.constexpr, C_TILE: tl.constexpr, K_PAD: tl.constexpr,
                    R_PAD: tl.constexpr,
                    HAS_LIST: tl.constexpr, HAS_FULL: tl.constexpr, SORTED: tl.constexpr,
                    WRITE_LSE: tl.constexpr, HAS_SCORED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    WIDE: tl.constexpr, PDL: tl.constexpr):
    wait_then_launch_dependents(PDL)
    # A tile of BLOCK_N tokens covers UPT = C_TILE whole units, or a unit spans SUB tiles.
    UPT: tl.constexpr = C_TILE
    SUB: tl.constexpr = U // BLOCK_N if U > BLOCK_N else 1
    TILE_UNIT: tl.constexpr = BLOCK_N // UPT  # tokens of one unit inside one tile

    w = tl.program_id(0)
    rows, n, nc, cum, C = _row_chunks(row_units, unit_counts, full_rows, seq_lens, R, HKV, T, K, ITEMS, C_FIXED,
                                       stride_cb, stride_ch, stride_fb, stride_fh, U, C_MIN, C_TILE, R_PAD,
                                       HAS_LIST, HAS_FULL, SORTED)
    if w >= tl.sum(nc, 0):
        return  # surplus program of the fixed-size grid
    r = tl.sum((cum <= w).to(tl.int32), 0)
    this = rows == r
    n_r = tl.sum(tl.where(this, n, 0), 0)
    chunk = w - tl.sum(tl.where(this, cum - nc, 0), 0)
    C = tl.sum(tl.where(this, C + tl.zeros_like(n), 0), 0)  # this row's chunk size
    b = r // HKV
    h = r % HKV
    seq_len = tl.minimum(tl.maximum(tl.load(seq_lens + b).to(tl.int32), 0), T)
    use_list = r < 0  # false; becomes true for list rows below
    if HAS_LIST:
        use_list = r >= 0
        if HAS_FULL:
            use_list = tl.load(full_rows + b * stride_fb + h * stride_fh) == 0
    first = chunk * C
    end = tl.minimum(first + C, n_r)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    offs = tl.arange(0, BLOCK_N)
    head_ok = g < G
    qt = tl.load(q + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                 mask=head_ok[:, None], other=0.0)
    k_head = k + h.to(tl.int64) * stride_kh
    v_head = v + h.to(tl.int64) * stride_vh
    table_row = block_tables + b.to(tl.int64) * stride_tb
    if SORTED:
        list_row = unit_lists + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
        list_stride = stride_lk
    else:
        list_row = sorted_units + r.to(tl.int64) * K_PAD
        list_stride = 1
    lse_row = unit_lse + b.to(tl.int64) * stride_eb + (h * G + g)[:, None] * stride_eh
    scored = r >= 0  # every row's units get their log-sum-exp, unless scored_rows says otherwise
    if HAS_SCORED:
        scored = tl.load(scored_rows + b * stride_sb + h * stride_sh) != 0

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for i in range(first, end, UPT):
        unit_m = tl.full([G_PAD, UPT], float("-inf"), tl.float32)
        unit_s = tl.zeros([G_PAD, UPT], tl.float32)
        for j in tl.static_range(SUB):
            pos = j * BLOCK_N + offs  # token position inside the UPT units starting at slot i
            unit = _unit_at(list_row, i + pos // U, end, use_list, list_stride, HAS_LIST, SORTED)
            tok = unit * U + pos % U
            ok = (unit >= 0) & (tok < seq_len)
            # logical token -> (physical block, slot): every token below seq_len has a table entry
            block = tl.load(table_row + (tok // P) * stride_tm, mask=ok, other=0)
            if WIDE:  # pools of 2**31 elements or more need 64-bit offsets
                block = block.to(tl.int64)
            k_tok = block * stride_kb + (tok % P) * stride_kt
            v_tok = block * stride_vb + (tok % P) * stride_vt
            kt = tl.load(k_head + k_tok[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale  # log2 units
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no NaN
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_head + v_tok[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
            m_i = m_new
            if WRITE_LSE:
                if scored:
                    # Exact per-unit log-sum-exp from the scores in registers (its own max, so units far
                    # below the running max do not underflow).
                    s3 = tl.reshape(s, [G_PAD, UPT, TILE_UNIT])
                    um_new = tl.maximum(unit_m, tl.max(s3, 2))
                    um_use = tl.where(um_new == float("-inf"), 0.0, um_new)
                    unit_s = unit_s * tl.math.exp2(unit_m - um_use) + tl.sum(tl.math.exp2(s3 - um_use[:, :, None]), 2)
                    unit_m = um_new
        if WRITE_LSE:
            if scored:
                units = _unit_at(list_row, i + tl.arange(0, UPT), end, use_list, list_stride, HAS_LIST, SORTED)
                unit_lse_val = (tl.where(unit_m == float("-inf"), 0.0, unit_m) + tl.math.log2(unit_s)) * _LN2
                tl.store(lse_row + units[None, :], unit_lse_val, mask=head_ok[:, None] & (units >= 0)[None, :])

    item = w.to(tl.int64) * G + g
    tl.store(part_acc + item[:, None] * D + d[None, :], acc, mask=head_ok[:, None])
    tl.store(part_m + item, m_i, mask=head_ok)
    tl.store(part_l + item, l_i, mask=head_ok)


@triton.jit
def _merge_kernel(part_acc, part_m, part_l, out, lse, row_units, unit_counts, full_rows, seq_lens,
                  R, HKV, T, K, ITEMS, C_FIXED, stride_ob, stride_oh, stride_cb, stride_ch, stride_fb, stride_fh,
                  G: tl.constexpr, D: tl.constexpr, U: tl.constexpr, C_MIN: tl.constexpr, C_TILE: tl.constexpr,
                  R_PAD: tl.constexpr, CB: tl.constexpr, HAS_LIST: tl.constexpr, HAS_FULL: tl.constexpr,
                  SORTED: tl.constexpr, PDL: tl.constexpr):
    wait_then_launch_dependents(PDL)
    pid = tl.program_id(0)  # (sequence, query head)
    b = pid // (HKV * G)
    hq = pid % (HKV * G)
    r = b * HKV + hq // G
    rows, n, nc, cum, _ = _row_chunks(row_units, unit_counts, full_rows, seq_lens, R, HKV, T, K, ITEMS, C_FIXED,
                                       stride_cb, stride_ch, stride_fb, stride_fh, U, C_MIN, C_TILE, R_PAD,
                                       HAS_LIST, HAS_FULL, SORTED)
    this = rows == r
    num_chunks = tl.sum(tl.where(this, nc, 0), 0)
    first = tl.sum(tl.where(this, cum - nc, 0), 0)

    offs = tl.arange(0, CB)
    d = tl.arange(0, D)
    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([D], tl.float32)
    # Fixed chunk order: the merge is deterministic and identical for full and list rows. Loads go to L2
    # only (.cg): every partial is read once.
    for c0 in range(0, num_chunks, CB):
        ok = c0 + offs < num_chunks
        item = (first + c0 + offs).to(tl.int64) * G + hq % G
        m_c = tl.load(part_m + item, mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_c = tl.load(part_l + item, mask=ok, other=0.0, cache_modifier=".cg")
        a_c = tl.load(part_acc + item[:, None] * D + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m_c, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_run - m_use)
        wgt = tl.math.exp2(m_c - m_use)
        l_run = l_run * alpha + tl.sum(wgt * l_c, 0)
        acc = acc * alpha + tl.sum(wgt[:, None] * a_c, 0)
        m_run = m_new
    has_mass = l_run > 0
    res = tl.where(has_mass, acc / tl.where(has_mass, l_run, 1.0), 0.0)
    tl.store(out + b.to(tl.int64) * stride_ob + hq * stride_oh + d, res.to(out.dtype.element_ty))
    tl.store(lse + pid, tl.where(has_mass, (m_run + tl.math.log2(tl.where(has_mass, l_run, 1.0))) * _LN2,
                                 float("-inf")))


# ---------------------------------------------------------------------------------------- host side

#: the callback of `record_attention_reads`, None outside it
_read_observer: Callable[..., None] | None = None


@contextmanager
def record_attention_reads(callback: Callable[..., None]) -> Iterator[None]:
    """Within the block, every `sparse_decode_attention` call first calls `callback(q, k, v, seq_lens,
    scale, unit_size, unit_lists, unit_counts, full_rows)` with its own arguments (`reference.
    visible_tokens` turns them into the tokens read; a paged cache is given as a copy in the logical
    layout [B, Hkv, T, D]; an offloaded cache calls with its GPU block pool, whose units are pool
    slots). For eager diagnostics only: a call being captured into a CUDA graph raises (the callback
    would run once at capture, never on replay). Process-wide, not per thread; one recorder at a time."""
    global _read_observer
    if _read_observer is not None:
        raise RuntimeError("record_attention_reads is already active; nesting is not supported")
    _read_observer = callback
    try:
        yield
    finally:
        _read_observer = None


# Scratch per (device, work items, G, D, rows, list width): reused by every call of that shape.
_SCRATCH: dict[tuple, dict[str, torch.Tensor]] = {}
# The block table of a static cache, arange(B)[:, None], per (device, B): read-only, never scratch.
_STATIC_TABLES: dict[tuple[torch.device, int], torch.Tensor] = {}
_NUM_SMS: dict[torch.device, int] = {}


@dataclass(frozen=True)
class Launch:
    """How the partial and merge kernels are launched. Any values compute the same op (up to the order
    of float sums); the defaults are what `sparsedecode bench kernel --tune` and `--launch` found fastest
    (docs/benchmarks.md, "Launch settings of the paged decode kernels")."""

    items_per_sm: int = 2  # work items the device-side chunk size aims for, per SM
    tile_elements: int = 16384  # K (or V) elements per tile of the partial kernel: 128 tokens at d=128
    num_warps: int = 4  # of the partial kernel
    num_stages: int = 2  # software-pipelining depth of the partial kernel (deeper measured slower)
    merge_elements: int = 16384  # partial-accumulator elements per step of the merge: 128 partials at d=128
    min_chunk_tokens: int = 128  # one tile: a small call (LFPS lists at batch 1) spreads over more SMs

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Launch.{name} must be a positive integer, not {value!r}")
        for name in ("tile_elements", "merge_elements"):  # the kernels' tiles are powers of 2
            if getattr(self, name) & (getattr(self, name) - 1):
                raise ValueError(f"Launch.{name} must be a power of 2, not {getattr(self, name)}")

    def tile_tokens(self, head_dim: int) -> int:
        return max(16, min(128, self.tile_elements // head_dim))


LAUNCH = Launch()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # H100 SXM: keeps CPU (interpreter) chunking equal to the GPU's
    if device not in _NUM_SMS:
        _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS[device]


def chunk_units(chunk_tokens: int, unit_size: int, tile_tokens: int) -> int:
    """Units in a chunk of about `chunk_tokens` tokens: whole tiles of the partial kernel, at least one."""
    per_tile = max(1, tile_tokens // unit_size)
    return max(per_tile, chunk_tokens // unit_size // per_tile * per_tile)


def _scratch(device: torch.device, work: int, group: int, head_dim: int, rows: int,
             k_pad: int) -> dict[str, torch.Tensor]:
    key = (device, work, group, head_dim, rows, k_pad)
    if key not in _SCRATCH:
        _SCRATCH[key] = {
            "acc": torch.empty(work * group * head_dim, dtype=torch.float32, device=device),
            "m": torch.empty(work * group, dtype=torch.float32, device=device),
            "l": torch.empty(work * group, dtype=torch.float32, device=device),
            "row_units": torch.empty(rows, dtype=torch.int32, device=device),
            "sorted": torch.empty(rows * k_pad, dtype=torch.int32, device=device),
        }
    return _SCRATCH[key]


def static_block_tables(device: torch.device, batch: int) -> torch.Tensor:
    """The block tables [B, 1] int32 of a static cache [B, Hkv, T, D], read as a pool of B blocks of T
    tokens, block b held by sequence b (cached, never to be written)."""
    key = (device, batch)
    if key not in _STATIC_TABLES:
        _STATIC_TABLES[key] = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
    return _STATIC_TABLES[key]


def _sparse_decode_triton(q, k, v, seq_lens, scale, unit_size, unit_lists, unit_counts, full_rows,
                          unit_lse, chunk_tokens, work_items, launch, sorted_lists, block_tables, scored_rows):
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    if block_tables is None:
        if k.shape[0] != batch:
            raise ValueError(f"a static cache needs one sequence per q row, not k {tuple(k.shape)}")
        block_tables = static_block_tables(q.device, batch)
    elif block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.is_floating_point():
        raise ValueError(f"block_tables must be [{batch}, max_blocks] integers, not {tuple(block_tables.shape)}")
    capacity = block_tables.shape[1] * page
    if num_heads != group * num_kv_heads or k.shape != v.shape:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if capacity % unit_size or head_dim & (head_dim - 1) or unit_size & (unit_size - 1):
        raise ValueError("capacity must be a multiple of unit_size; head_dim, unit_size powers of 2")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v need a contiguous last dimension")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError("q, k, v must share a dtype")
    has_list = unit_lists is not None
    has_full = has_list and full_rows is not None
    if has_list and unit_counts is None:
        raise ValueError("unit_lists needs unit_counts")
    device = q.device
    rows = batch * num_kv_heads
    num_units = capacity // unit_size
    block_n = launch.tile_tokens(head_dim)
    tile_units = max(1, block_n // unit_size)
    min_chunk = chunk_units(launch.min_chunk_tokens, unit_size, block_n)
    fixed_chunk = chunk_units(chunk_tokens, unit_size, block_n) if chunk_tokens else 0
    items = work_items or launch.items_per_sm * _num_sms(device)
    list_width = unit_lists.shape[-1] if has_list else 0
    k_pad = max(2, triton.next_power_of_2(list_width))
    # Fixed grid (shapes only, no host sync): the most items any row can have, times the rows; with
    # chunks sized on the device, at most `items` + one partial chunk per row.
    most_units = num_units if (has_full or not has_list) else min(list_width, num_units)
    work = rows * triton.cdiv(most_units, fixed_chunk or min_chunk)
    if not fixed_chunk:
        work = min(work, items + rows)
    r_pad = triton.next_power_of_2(rows)
    buf = _scratch(device, max(work, 1), group, head_dim, rows, k_pad)
    pdl = pdl_launch(device)

    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=device)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=device)
    if unit_lse is not None:
        if unit_lse.shape != (batch, num_heads, num_units) or unit_lse.stride(-1) != 1:
            raise ValueError(f"unit_lse must be [B, Hq, {num_units}] with a contiguous last dimension")
        unit_lse.fill_(float("-inf"))  # units nobody visits or scores
    has_scored = unit_lse is not None and scored_rows is not None
    if has_scored:
        check_scored_rows(scored_rows, batch, num_kv_heads)
        sstride = scored_rows.stride()
    else:
        scored_rows, sstride = seq_lens, (0, 0)  # unused pointer
    if has_full:
        fstride = full_rows.stride()
    else:
        full_rows, fstride = seq_lens, (0, 0)  # unused pointer
    if has_list:
        lstride, cstride = unit_lists.stride(), unit_counts.stride()
    else:
        unit_lists, unit_counts, lstride, cstride = seq_lens, seq_lens, (0, 0, 0), (0, 0)  # unused pointers
    sorted_lists = has_list and sorted_lists
    if has_list and not sorted_lists:
        _plan_kernel[(rows,)](
            unit_lists, unit_counts, full_rows, seq_lens, buf["row_units"], buf["sorted"],
            num_kv_heads, capacity, list_width,
            *unit_lists.stride(), *unit_counts.stride(), *fstride,
            U=unit_size, K_PAD=k_pad, HAS_FULL=has_full, num_warps=4, **pdl)
    lse_buf = unit_lse if unit_lse is not None else lse
    lse_stride = unit_lse.stride()[:2] if unit_lse is not None else (0, 0)
    if work > 0:
        two_byte = q.element_size() == 2
        _partial_kernel[(work,)](
            q, k, v, block_tables, seq_lens, buf["row_units"], buf["sorted"], unit_lists, unit_counts, full_rows,
            scored_rows, buf["acc"], buf["m"], buf["l"], lse_buf,
            scale * LOG2E, rows, num_kv_heads, capacity, list_width, items, fixed_chunk,
            q.stride(0), q.stride(1), *block_tables.stride(), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *lstride, *cstride, *fstride, *sstride, *lse_stride,
            G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=head_dim, U=unit_size, P=page,
            BLOCK_N=block_n, C_MIN=min_chunk, C_TILE=tile_units, K_PAD=k_pad, R_PAD=r_pad,
            HAS_LIST=has_list, HAS_FULL=has_full, SORTED=sorted_lists, WRITE_LSE=unit_lse is not None,
            HAS_SCORED=has_scored,
            DOT_PRECISION="tf32" if two_byte else "ieee", WIDE=max(k.numel(), v.numel()) >= 2**31,
            num_warps=launch.num_warps, num_stages=launch.num_stages if two_byte else min(launch.num_stages, 2),
            **pdl)
    _merge_kernel[(batch * num_heads,)](
        buf["acc"], buf["m"], buf["l"], out, lse, buf["row_units"], unit_counts, full_rows, seq_lens,
        rows, num_kv_heads, capacity, list_width, items, fixed_chunk, out.stride(0), out.stride(1), *cstride,
        *fstride, G=group, D=head_dim, U=unit_size, C_MIN=min_chunk, C_TILE=tile_units, R_PAD=r_pad,
        CB=max(8, launch.merge_elements // head_dim), HAS_LIST=has_list, HAS_FULL=has_full,
        SORTED=sorted_lists, num_warps=4, **pdl)
    return out, lse


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    unit_size: int = 64,
    unit_lists: torch.Tensor | None = None,
    unit_counts: torch.Tensor | None = None,
    full_rows: torch.Tensor | None = None,
    unit_lse: torch.Tensor | None = None,
    *,
    backend: Literal["auto", "triton", "reference"] = "auto",
    chunk_tokens: int | None = None,
    work_items: int | None = None,
    launch: Launch = LAUNCH,
    sorted_lists: bool = False,
    block_tables: torch.Tensor | None = None,
    scored_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode attention; same arguments and results as `sparse_decode_attention_ref` (with
    `block_tables`, k and v are paged pools; see there).

    backend "auto" runs Triton on CUDA tensors and the PyTorch reference on CPU ones; "triton" on CPU
    tensors needs TRITON_INTERPRET=1 set before triton was imported (the tests do this).
    chunk_tokens fixes the work-item size (tests and tuning); by default it is sized on the device so
    that the units this call visits make about `work_items` items (default `launch.items_per_sm` per
    SM). `launch` sets the kernels' tiles, warps and pipelining (see `Launch`).
    sorted_lists=True promises that the first `unit_counts` entries of every list are unique and below
    ceil(len / unit_size) (what `select_blocks` and `lfps_candidates_into` write, ascending): the op then
    visits them in the given order and skips its sorting launch; the same units stored elsewhere and
    listed in the same order (an offload pool) give the same bits. Lists that break the promise stay
    in bounds but give another result than the reference.
    scored_rows [B, Hkv] bool limits `unit_lse` to the rows whose scores a selection reads (see the
    reference); the others skip the per-unit sums.
    """
    if _read_observer is not None:  # a global test: nothing to pay when no diagnostic records
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("record_attention_reads needs eager decoding; turn CUDA graphs off")
        logical = (k, v) if block_tables is None else (gather_blocks(k, block_tables), gather_blocks(v, block_tables))
        _read_observer(q, *logical, seq_lens, scale, unit_size, unit_lists, unit_counts, full_rows)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "reference":
        return sparse_decode_attention_ref(q, k, v, seq_lens, scale, unit_size, unit_lists, unit_counts,
                                           full_rows, unit_lse, block_tables=block_tables, scored_rows=scored_rows)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 before importing triton")
    return _sparse_decode_triton(q, k, v, seq_lens, scale, unit_size, unit_lists, unit_counts, full_rows,
                                 unit_lse, chunk_tokens, work_items, launch, sorted_lists, block_tables, scored_rows)
