"""LFPS candidate lists in one Triton launch: shifted previous selection, sink and local window together.

Computes exactly what `methods.lfps.lfps_candidates` does in PyTorch (the reference), with the same
arguments, writing into caller-owned buffers:

* one program per row (sequence b, KV head h); held = ceil(seq_len / block_size) blocks hold tokens
  (seq_len at most num_blocks * block_size);
* the candidates are the blocks n with 0 <= n < held that are p + o for a valid previous block p (the
  first `counts[b, h]` entries of `blocks[b, h]`, at most K) and an offset o of `offsets`, or a sink
  block (n < sink_blocks), or in the local window (n >= held - local_blocks);
* out_blocks[b, h] gets them unique and ascending, then the sentinel `num_blocks` up to the list width
  W = K * len(offsets) + sink_blocks + local_blocks; out_counts[b, h] gets their number;
* with `rows` [B, H] bool and a handed selection (`handed_blocks` [B, H, KH], `handed_counts` [B, H]):
  the rows where `rows` is False get the handed list instead, all KH entries as they are, then the
  sentinel up to W, and the handed count (lychee+lfps: sparse heads read the blocks handed on to them).

Algorithm (no host synchronisation, fixed shapes, so it can be captured in a CUDA graph): a scratch
int8 bitmap row [NB] in global memory is cleared up to held, each shifted valid previous block sets its
bit (a scattered store per offset; duplicates write the same byte), then chunk by chunk the bitmap is
read back, sink and local blocks are OR-ed in, a cumulative sum gives every chosen block its slot in
ascending order and one scattered store writes it; a last store fills the sentinel slots. Barriers
order the clearing, the setting and the reading of the bitmap within the program. Integers only: the
results equal the reference's exactly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, wait_then_launch_dependents

#: blocks of the bitmap a program reads back at a time (the chunk lives in registers)
CHUNK_BLOCKS = 1024


@triton.jit
def _lfps_candidates_kernel(
    blocks, counts, seq_lens, offsets, rows, handed_blocks, handed_counts, bitmap, out_blocks, out_counts,
    s_bb, s_bh, s_bk, s_cb, s_ch, s_rb, s_rh, s_hb, s_hh, s_hk, s_nb, s_nh, s_mb, s_mh, s_ob, s_oh, s_ok, s_qb, s_qh,
    HKV, NB, K, KH, W, block_size, sink_blocks, local_blocks,
    O: tl.constexpr, K_PAD: tl.constexpr, W_PAD: tl.constexpr, CHUNK: tl.constexpr, HANDED: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_then_launch_dependents(PDL)
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    out_row = out_blocks + b * s_ob + h * s_oh
    w = tl.arange(0, W_PAD)
    candidate_row = True
    if HANDED:
        candidate_row = tl.load(rows + b * s_rb + h * s_rh) != 0
    if candidate_row:
        seq_len = tl.load(seq_lens + b).to(tl.int32)
        held = tl.minimum((seq_len + block_size - 1) // block_size, NB)  # the bound keeps stores in the row
        bits = bitmap + b * s_mb + h * s_mh
        c = tl.arange(0, CHUNK)
        for start in range(0, held, CHUNK):
            tl.store(bits + start + c, tl.zeros([CHUNK], tl.int8), mask=start + c < held)
        tl.debug_barrier()  # cleared before any bit is set

        k = tl.arange(0, K_PAD)
        kept = (k < K) & (k < tl.load(counts + b * s_cb + h * s_ch))
        previous = tl.load(blocks + b * s_bb + h * s_bh + k * s_bk, mask=kept, other=0).to(tl.int64)
        for i in tl.static_range(O):
            shifted = previous + tl.load(offsets + i).to(tl.int64)
            tl.store(bits + shifted, tl.full([K_PAD], 1, tl.int8), mask=kept & (shifted >= 0) & (shifted < held))
        tl.debug_barrier()  # every bit set before the bitmap is read

        taken = tl.zeros_like(held)
        for start in range(0, held, CHUNK):
            n = start + c
            inside = n < held
            chosen = tl.load(bits + n, mask=inside, other=0) != 0
            chosen = inside & (chosen | (n < sink_blocks) | (n >= held - local_blocks))
            slot = taken + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            tl.store(out_row + slot * s_ok, n, mask=chosen)
            taken += tl.sum(chosen.to(tl.int32), axis=0)
        tl.store(out_row + w * s_ok, tl.zeros_like(w) + NB, mask=(w >= taken) & (w < W))
        tl.store(out_counts + b * s_qb + h * s_qh, taken)
    else:
        handed = tl.load(handed_blocks + b * s_hb + h * s_hh + w * s_hk, mask=w < KH, other=NB)
        tl.store(out_row + w * s_ok, handed, mask=w < W)
        tl.store(out_counts + b * s_qb + h * s_qh, tl.load(handed_counts + b * s_nb + h * s_nh))


def lfps_candidates_into(
    blocks: torch.Tensor,
    counts: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    offsets: torch.Tensor,
    sink_blocks: int,
    local_blocks: int,
    num_blocks: int,
    rows: torch.Tensor | None = None,
    handed_blocks: torch.Tensor | None = None,
    handed_counts: torch.Tensor | None = None,
    *,
    out_blocks: torch.Tensor,
    out_counts: torch.Tensor,
    bitmap: torch.Tensor,
) -> None:
    """`methods.lfps.lfps_candidates` (same arguments) written into `out_blocks` / `out_counts`.

    blocks [B, H, K] int32 previous selection, counts [B, H] int32, seq_lens [B] integer, offsets [O]
    integer; rows [B, H] bool with handed_blocks [B, H, KH] int32 and handed_counts [B, H] int32 (all or
    none): rows where `rows` is False get the handed list. out_blocks [B, H, W] int32 with
    W = K * O + sink_blocks + local_blocks >= KH, out_counts [B, H] int32; bitmap [B, H, num_blocks]
    int8 scratch (any contents). One launch, no host synchronisation. On CPU tensors it needs
    TRITON_INTERPRET=1 (tests only).
    """
    batch, heads, k_len = blocks.shape
    width = k_len * offsets.shape[0] + sink_blocks + local_blocks
    handed = rows is not None
    if handed != (handed_blocks is not None) or handed != (handed_counts is not None):
        raise ValueError("rows, handed_blocks and handed_counts go together")
    if out_blocks.shape != (batch, heads, width) or out_counts.shape != (batch, heads):
        raise ValueError(f"out_blocks must be [{batch}, {heads}, {width}] and out_counts [{batch}, {heads}], not "
                         f"{tuple(out_blocks.shape)} and {tuple(out_counts.shape)}")
    if counts.shape != (batch, heads) or bitmap.shape != (batch, heads, num_blocks) or seq_lens.shape != (batch,):
        raise ValueError("counts, seq_lens and bitmap must match blocks' batch and heads")
    if handed and (rows.shape != (batch, heads) or handed_counts.shape != (batch, heads)
                   or handed_blocks.shape[:2] != (batch, heads) or handed_blocks.shape[-1] > width):
        raise ValueError(f"rows, handed_blocks and handed_counts must be [{batch}, {heads}(, <= {width})]")
    if bitmap.stride(-1) != 1 or seq_lens.stride(0) != 1 or offsets.stride(0) != 1:
        raise ValueError("bitmap, seq_lens and offsets need a contiguous last dimension")
    if bitmap.dtype != torch.int8 or any(t.dtype != torch.int32 for t in (blocks, counts, out_blocks, out_counts)):
        raise ValueError("blocks, counts, out_blocks and out_counts must be int32 and bitmap int8")
    if handed and (handed_blocks.dtype != torch.int32 or handed_counts.dtype != torch.int32):
        raise ValueError("handed_blocks and handed_counts must be int32")
    if not blocks.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 before importing triton")
    if batch * heads == 0:
        return
    if handed:
        rows = rows.view(torch.uint8) if rows.dtype == torch.bool else rows
        handed_tensors = (rows, handed_blocks, handed_counts)
        handed_strides = (*rows.stride(), *handed_blocks.stride(), *handed_counts.stride())
    else:  # placeholders, never read
        handed_tensors, handed_strides = (out_counts, out_blocks, out_counts), (0,) * 7
    _lfps_candidates_kernel[(batch * heads,)](
        blocks, counts, seq_lens, offsets, *handed_tensors, bitmap, out_blocks, out_counts,
        *blocks.stride(), *counts.stride(), *handed_strides, bitmap.stride(0), bitmap.stride(1),
        *out_blocks.stride(), *out_counts.stride(),
        heads, num_blocks, k_len, handed_blocks.shape[-1] if handed else 0, width,
        block_size, sink_blocks, local_blocks,
        O=offsets.shape[0], K_PAD=max(16, triton.next_power_of_2(k_len)), W_PAD=max(16, triton.next_power_of_2(width)),
        CHUNK=min(CHUNK_BLOCKS, max(16, triton.next_power_of_2(num_blocks))), HANDED=handed,
        num_warps=4, **pdl_launch(blocks.device),
    )
