"""Quest's page scores in one Triton launch, with the new token's key folded into its page bounds.

Computes `reference.quest_page_scores_ref` (read its docstring for the op): grid (rows, page tiles),
one row = (sequence b, KV head h). Every program loads its tile of TILE logical pages of k_min / k_max,
each page from its physical block through the row's block table (a static cache is one block per
sequence, table arange(B)[:, None], so both layouts run the same code), and the G query heads of the
group, and scores the tile with two dot products, relu(q) . max + min(q, 0) . min (products of
cache-dtype values, float32 accumulation), then takes the max or sum over the group. The program whose
tile holds the page being written (seq_len - 1) computes that page's new bounds, stores them into the
page's physical block, and scores with the new values from its registers, so no other program and no
second launch depend on the stores (the written block is the row's own: no other table entry names
it). Replaces the ~20 small PyTorch launches per layer of the reference (gathers, scatters, two
batched GEMMs, the group reduction, casts) with one.

Results equal the reference up to the order of float32 sums over d (the bounds exactly).
"""
from __future__ import annotations

import os
from typing import Literal

import torch
import triton
import triton.language as tl

from .reference import quest_page_scores_ref
from .sparse_decode import static_block_tables

#: pages a program scores (two [TILE, D] tiles in registers)
PAGES_PER_PROGRAM = 64


@triton.jit
def _quest_page_scores_kernel(q, k, k_min, k_max, block_tables, seq_lens, scores,
                              s_qb, s_qh, s_tb, s_tm, s_kb, s_kh, s_kt, s_mb, s_mh, s_mp, s_sb, s_sh,
                              HKV, NP, BLOCK, PPB, page_size,
                              G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr,
                              AGG_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    r = tl.program_id(0)
    tile = tl.program_id(1)
    b = r // HKV
    h = r % HKV
    d = tl.arange(0, D)
    p = tile * TILE + tl.arange(0, TILE)
    in_np = p < NP
    table_row = block_tables + b.to(tl.int64) * s_tb
    # logical page p -> page p % PPB of block table[b, p // PPB]
    block = tl.load(table_row + (p // PPB) * s_tm, mask=in_np, other=0).to(tl.int64)
    rows = block * s_mb + h.to(tl.int64) * s_mh + (p % PPB) * s_mp
    tile_min = tl.load(k_min + rows[:, None] + d[None, :], mask=in_np[:, None], other=0.0)
    tile_max = tl.load(k_max + rows[:, None] + d[None, :], mask=in_np[:, None], other=0.0)

    pos = tl.load(seq_lens + b).to(tl.int32) - 1
    page = pos // page_size
    if (pos >= 0) & (page >= tile * TILE) & (page < tile * TILE + TILE) & (page < NP):
        block_w = tl.load(table_row + (pos // BLOCK) * s_tm).to(tl.int64)
        slot = pos % BLOCK
        new_key = tl.load(k + block_w * s_kb + h.to(tl.int64) * s_kh + slot * s_kt + d)
        row_w = block_w * s_mb + h.to(tl.int64) * s_mh + (slot // page_size) * s_mp
        starts = pos % page_size == 0
        dtype = k_min.dtype.element_ty
        new_min = tl.where(starts, new_key, tl.minimum(tl.load(k_min + row_w + d), new_key)).to(dtype)
        new_max = tl.where(starts, new_key, tl.maximum(tl.load(k_max + row_w + d), new_key)).to(dtype)
        tl.store(k_min + row_w + d, new_min)
        tl.store(k_max + row_w + d, new_max)
        is_page = (p == page)[:, None]
        tile_min = tl.where(is_page, new_min[None, :], tile_min)
        tile_max = tl.where(is_page, new_max[None, :], tile_max)

    g = tl.arange(0, G_PAD)
    head_ok = g < G
    # q in the cache dtype (as the reference), split in float32 (exact), the halves back in the cache dtype
    qt = tl.load(q + b.to(tl.int64) * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=head_ok[:, None],
                 other=0.0).to(k_min.dtype.element_ty).to(tl.float32)
    q_pos = tl.maximum(qt, 0.0).to(k_min.dtype.element_ty)
    q_neg = tl.minimum(qt, 0.0).to(k_min.dtype.element_ty)
    s = tl.dot(q_pos, tl.trans(tile_max.to(k_min.dtype.element_ty)), input_precision=DOT_PRECISION)
    s += tl.dot(q_neg, tl.trans(tile_min.to(k_min.dtype.element_ty)), input_precision=DOT_PRECISION)  # [G_PAD, TILE]
    if AGG_SUM:
        score = tl.sum(tl.where(head_ok[:, None], s, 0.0), 0)
    else:
        score = tl.max(tl.where(head_ok[:, None], s, float("-inf")), 0)
    tl.store(scores + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh + p, score, mask=in_np)


def quest_page_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    aggregate: str,
    scores: torch.Tensor | None = None,
    *,
    backend: Literal["auto", "triton", "reference"] = "auto",
    block_tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fold every row's newest key into its page bounds (in place) and return the page scores
    [B, Hkv, NP] float32 (into `scores` when given); the op of `reference.quest_page_scores_ref`, whose
    docstring also says what k, k_min and k_max are with `block_tables` (a paged cache).

    backend "auto" runs one Triton launch on CUDA tensors (no host synchronisation: graph-capturable)
    and the reference on CPU ones; "triton" on CPU tensors needs TRITON_INTERPRET=1 (the tests)."""
    if aggregate not in ("max", "sum"):
        raise ValueError(f"page score aggregation must be 'max' or 'sum', not {aggregate!r}")
    batch, heads, dim = q.shape
    _, kv_heads, block, _ = k.shape
    if block_tables is None:  # one block of T tokens per sequence, holding all its pages
        pages_per_block, max_blocks = k_min.shape[2], 1
        fits = k.shape[0] == batch and pages_per_block * page_size <= block
    else:
        pages_per_block, max_blocks = block // page_size, block_tables.shape[1]
        fits = block % page_size == 0 and block_tables.shape == (batch, max_blocks)
    if (not fits or heads % kv_heads or k_min.shape != (k.shape[0], kv_heads, pages_per_block, dim)
            or k_max.shape != k_min.shape):
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} k_min {tuple(k_min.shape)} "
                         f"k_max {tuple(k_max.shape)} for pages of {page_size}")
    if k_min.dtype != k.dtype or k_max.dtype != k.dtype:
        raise ValueError("k_min and k_max must have the key cache's dtype")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "reference":
        result = quest_page_scores_ref(q, k, k_min, k_max, seq_lens, page_size, aggregate, block_tables=block_tables)
        return result if scores is None else scores.copy_(result)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 before importing triton")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or k_min.stride() != k_max.stride() or k_min.stride(-1) != 1:
        raise ValueError("q, k, k_min and k_max need a contiguous last dimension; k_min and k_max equal strides")
    if dim & (dim - 1):
        raise ValueError(f"the kernel needs a power-of-2 head_dim, not {dim}")
    num_pages = max_blocks * pages_per_block
    if scores is None:
        scores = torch.empty(batch, kv_heads, num_pages, dtype=torch.float32, device=q.device)
    if scores.shape != (batch, kv_heads, num_pages) or scores.dtype != torch.float32 or scores.stride(-1) != 1:
        raise ValueError(f"scores must be [{batch}, {kv_heads}, {num_pages}] float32, contiguous in pages")
    if block_tables is None:
        block_tables = static_block_tables(q.device, batch)
    group = heads // kv_heads
    grid = (batch * kv_heads, triton.cdiv(num_pages, PAGES_PER_PROGRAM))
    _quest_page_scores_kernel[grid](
        q, k, k_min, k_max, block_tables, seq_lens, scores,
        q.stride(0), q.stride(1), *block_tables.stride(), k.stride(0), k.stride(1), k.stride(2),
        *k_min.stride()[:3], *scores.stride()[:2],
        kv_heads, num_pages, block, pages_per_block, page_size,
        G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=dim, TILE=PAGES_PER_PROGRAM,
        AGG_SUM=aggregate == "sum", DOT_PRECISION="tf32" if k.element_size() == 2 else "ieee", num_warps=4)
    return scores
