"""Block selection in one Triton launch: per-block scores, budget, top-k and the ascending list together.

Computes exactly what `core.selection` does in PyTorch for the budget modes "tokens" and "ratio"
(`block_scores`, then `BlockSelector.select`, then a masked copy into the rows being updated):

* one program per row (sequence b, KV head h); rows where `rows_mask` is False return at once and
  their `blocks` / `counts` entries are not written;
* score[n] = max or sum over the G = Hq / Hkv query heads of the group of exp(unit_lse - lse), NaN
  (both -inf) read as 0 and +inf as the largest finite float, as `block_scores` does (with
  `share_heads`, the group scores are then summed over the KV heads);
* valid = ceil(seq_len / block_size); blocks n < sink_blocks or valid - local_blocks <= n < valid are
  forced, blocks n >= valid are never chosen;
* count = budget // block_size ("tokens", at least 1) or ceil(float32(budget) * valid) ("ratio"), then
  at least the number of forced valid blocks and at most valid and K;
* the `count` best blocks, forced first, then by score, equal scores by the lower block index (the
  reference ranks with a stable sort, so it breaks ties the same way), are written in ascending order
  to blocks[b, h, :count]; the slots after count get the sentinel NB; counts[b, h] = count.

Algorithm (per program, no host synchronisation, so it can be captured in a CUDA graph): each block gets an
unsigned 32-bit key that orders like its score (the float bits with the sign bit flipped for non-negative
values and all bits flipped for negative ones; forced blocks 0xFFFFFFFF, invalid blocks 0). A radix select,
bit by bit from the most significant one (up to 32 block-wide counts of the keys at or above a candidate),
finds the count-th largest key T. It stops as soon as exactly `count` keys lie at or above the prefix found so
far (the chosen set is then fixed, and the steps below choose it with the prefix in place of T), which on
distinct scores is well before the last bit. Blocks with a key above T are chosen, and of the blocks whose key
equals T the first (count - #above) by index.
One inclusive scan of (#above, #ties) packed in an int32 gives every chosen block its slot in ascending
block order, and one scattered store writes it; a second store fills the sentinel slots.

Scores equal the PyTorch path's bit for bit on CUDA: the exponential is libdevice's expf (equal to `torch.exp`
on CUDA, subnormal results included; Triton's `tl.exp` is an approximation), and sums over the group (or the
KV heads) are added in the order of PyTorch's CUDA reduction over a short strided dimension: four accumulators
taking the terms in turn, combined as ((a0 + a1) + a2) + a3 (PyTorch 2.11's order; for at most 4 terms the
plain one). Should a PyTorch version change that order, the results differ only where two blocks' scores are
within an ulp at the cut. In the interpreter (CPU tests) the order is PyTorch's CPU one (term after term) and
the exponential NumPy's, which can differ from PyTorch's in the last bit.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, wait_then_launch_dependents

try:  # libdevice's accurate expf (the interpreter cannot run extern calls: it uses tl.exp there)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older triton
    from triton.language.extra.cuda import libdevice

SELECT_MODES = ("tokens", "ratio")
#: largest number of blocks per row the kernel takes (the padded block axis lives in registers)
MAX_BLOCKS = 16384

_FLT_MAX = tl.constexpr(3.4028234663852886e38)


def launch_warps(nb_pad: int) -> int:
    """Warps of a program for a padded row of `nb_pad` blocks: the fastest per row size measured by
    `sparsedecode bench kernel --select` (docs/notes/2026-11-30-kernels.md)."""
    return 8 if nb_pad <= 4096 else 16


@triton.jit
def _probability(u, l, CUDA: tl.constexpr):
    """exp(u - l) with NaN read as 0 and +inf as the largest float (`block_scores`' nan_to_num)."""
    x = u - l
    if CUDA:
        p = libdevice.exp(x)
    else:
        p = tl.exp(x)
    p = tl.where(p != p, 0.0, p)
    return tl.where(p == float("inf"), _FLT_MAX, p)


@triton.jit
def _add(a0, a1, a2, a3, x, I: tl.constexpr, CUDA_ORDER: tl.constexpr):
    """Term I >= 1 of a short sum (term 0 in a0, a1..a3 zero; the result is ((a0 + a1) + a2) + a3),
    added in PyTorch's order: on the CPU one after the other, on CUDA (a reduction over a strided
    dimension of a few elements) into four accumulators in turn, term I into I % 4."""
    if CUDA_ORDER:
        if I % 4 == 0:
            a0 = a0 + x
        elif I % 4 == 1:
            a1 = a1 + x
        elif I % 4 == 2:
            a2 = a2 + x
        else:
            a3 = a3 + x
    else:
        a0 = a0 + x
    return a0, a1, a2, a3


@triton.jit
def _kv_head_score(unit_lse, lse, b, kv, offs, in_nb, s_ub, s_uh, s_lb, s_lh,
                   G: tl.constexpr, HAS_LSE: tl.constexpr, AGG_SUM: tl.constexpr, CUDA: tl.constexpr):
    """Score of every block for KV head `kv`: the group's max or sum of the probabilities; without
    lse, `unit_lse` already holds the block scores [B, Hkv, NB]."""
    if HAS_LSE:
        head = kv * G
        u = tl.load(unit_lse + b * s_ub + head * s_uh + offs, mask=in_nb, other=float("-inf"))
        a0 = _probability(u, tl.load(lse + b * s_lb + head * s_lh), CUDA)
        a1 = tl.zeros_like(a0)
        a2 = tl.zeros_like(a0)
        a3 = tl.zeros_like(a0)
        for g in tl.static_range(1, G):
            u = tl.load(unit_lse + b * s_ub + (head + g) * s_uh + offs, mask=in_nb, other=float("-inf"))
            p = _probability(u, tl.load(lse + b * s_lb + (head + g) * s_lh), CUDA)
            if AGG_SUM:
                a0, a1, a2, a3 = _add(a0, a1, a2, a3, p, g, CUDA)
            else:
                a0 = tl.maximum(a0, p)
        score = ((a0 + a1) + a2) + a3
    else:
        score = tl.load(unit_lse + b * s_ub + kv * s_uh + offs, mask=in_nb, other=0.0)
    return score


@triton.jit
def _select_blocks_kernel(
    unit_lse, lse, seq_lens, rows_mask, blocks, counts, copy_blocks, copy_counts,
    s_ub, s_uh, s_lb, s_lh, s_mb, s_mh, s_bb, s_bh, s_bk, s_cb, s_ch, s_xb, s_xh, s_xk, s_yb, s_yh,
    HKV, NB, K, tokens_count, budget, block_size, sink_blocks, local_blocks,
    G: tl.constexpr, NB_PAD: tl.constexpr, K_PAD: tl.constexpr, HAS_LSE: tl.constexpr,
    AGG_SUM: tl.constexpr, RATIO: tl.constexpr, SHARED_HEADS: tl.constexpr, CUDA: tl.constexpr,
    COPY: tl.constexpr, PDL: tl.constexpr,
):
    wait_then_launch_dependents(PDL)
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    active = tl.load(rows_mask + b * s_mb + h * s_mh) != 0
    if active:
        offs = tl.arange(0, NB_PAD)
        in_nb = offs < NB
        # --- scores [NB_PAD] (padding: 0, made invalid below)
        if SHARED_HEADS > 0:  # TidalDecode: every row takes the sum over the KV heads
            a0 = _kv_head_score(unit_lse, lse, b, 0, offs, in_nb, s_ub, s_uh, s_lb, s_lh, G, HAS_LSE, AGG_SUM, CUDA)
            a1 = tl.zeros_like(a0)
            a2 = tl.zeros_like(a0)
            a3 = tl.zeros_like(a0)
            for kv in tl.static_range(1, SHARED_HEADS):
                x = _kv_head_score(unit_lse, lse, b, kv, offs, in_nb, s_ub, s_uh, s_lb, s_lh, G, HAS_LSE, AGG_SUM,
                                   CUDA)
                a0, a1, a2, a3 = _add(a0, a1, a2, a3, x, kv, CUDA)
            score = ((a0 + a1) + a2) + a3
        else:
            score = _kv_head_score(unit_lse, lse, b, h, offs, in_nb, s_ub, s_uh, s_lb, s_lh, G, HAS_LSE, AGG_SUM, CUDA)
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in a float comparison

        # --- order-preserving uint32 keys: forced blocks first, invalid ones last
        bits = score.to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        seq_len = tl.load(seq_lens + b).to(tl.int32)
        valid = (seq_len + block_size - 1) // block_size
        is_valid = in_nb & (offs < valid)
        forced = (offs < sink_blocks) | (offs >= valid - local_blocks)
        key = tl.where(forced, 0xFFFFFFFF, key)
        key = tl.where(is_valid, key, 0)

        # --- how many to keep
        n_forced = tl.sum((is_valid & forced).to(tl.int32), axis=0)
        if RATIO:
            count = tl.math.ceil(budget * valid.to(tl.float32)).to(tl.int32)
        else:
            count = tl.zeros_like(valid) + tokens_count
        count = tl.minimum(tl.minimum(tl.maximum(count, n_forced), valid), K)

        # --- radix select of the count-th largest key T (the largest T with #(key >= T) >= count),
        # stopped early once exactly `count` keys are >= the prefix: that set is the answer already
        thr = tl.zeros_like(count).to(tl.uint32)
        n_ge = tl.zeros_like(count) + NB_PAD
        bit = tl.zeros_like(count) + 31
        while (bit >= 0) & (n_ge != count):
            cand = thr | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
            n_cand = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(n_cand >= count, cand, thr)
            n_ge = tl.where(n_cand >= count, n_cand, n_ge)
            bit -= 1

        # --- slots: blocks above T, then of those equal to T the first (count - #above) by index,
        # all in ascending block order (one scan of #above and #ties packed in an int32)
        above = is_valid & (key > thr)
        ties = is_valid & (key == thr) & (count > 0)
        scan = tl.cumsum(above.to(tl.int32) + (ties.to(tl.int32) << 16), axis=0)
        n_above = tl.sum(above.to(tl.int32), axis=0)
        ties_before = scan >> 16  # inclusive
        chosen = above | (ties & (ties_before <= count - n_above))
        slot = (scan & 0xFFFF) + tl.minimum(ties_before, count - n_above) - 1
        row = blocks + b * s_bb + h * s_bh
        tl.store(row + slot * s_bk, offs, mask=chosen)
        k = tl.arange(0, K_PAD)
        tl.store(row + k * s_bk, tl.zeros_like(k) + NB, mask=(k >= count) & (k < K))
        tl.store(counts + b * s_cb + h * s_ch, count)
        if COPY:
            row = copy_blocks + b * s_xb + h * s_xh
            tl.store(row + slot * s_xk, offs, mask=chosen)
            tl.store(row + k * s_xk, tl.zeros_like(k) + NB, mask=(k >= count) & (k < K))
            tl.store(copy_counts + b * s_yb + h * s_yh, count)


def select_blocks(
    unit_lse: torch.Tensor,
    lse: torch.Tensor | None,
    seq_lens: torch.Tensor,
    rows_mask: torch.Tensor,
    blocks: torch.Tensor,
    counts: torch.Tensor,
    *,
    aggregate: str,
    mode: str,
    budget: float,
    block_size: int,
    sink_blocks: int,
    local_blocks: int,
    share_heads: bool = False,
    copy_to: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_warps: int | None = None,
) -> None:
    """Select blocks for the rows in `rows_mask` and write them into `blocks` / `counts` in place.

    unit_lse [B, Hq, NB] float32: per-block log-sum-exp (-inf for unvisited blocks) with lse [B, Hq]
    float32 the rows' log-sum-exp; or, with lse None, unit_lse holds block scores [B, Hkv, NB] as
    `block_scores` returns them (aggregate is then unused). seq_lens [B] integer; rows_mask [B, Hkv]
    bool: the rows to update; blocks [B, Hkv, K] int32 and counts [B, Hkv] int32, written for the
    masked rows only. share_heads: every row selects from the sum over the KV heads of the scores.
    copy_to: a second (blocks, counts) pair of the same shapes that gets the same entries.
    num_warps: of the program (default `launch_warps`); changes the speed only.
    One launch, no host synchronisation. On CPU tensors it needs TRITON_INTERPRET=1 (tests only).
    """
    if mode not in SELECT_MODES:
        raise ValueError(f"the kernel selects in modes {SELECT_MODES}, not {mode!r}")
    if aggregate not in ("max", "sum"):
        raise ValueError(f"block score aggregation must be 'max' or 'sum', not {aggregate!r}")
    batch, kv_heads, k_len = blocks.shape
    num_blocks = unit_lse.shape[-1]
    heads = unit_lse.shape[1]
    if lse is not None:
        group = heads // kv_heads
        if heads != group * kv_heads or lse.shape != (batch, heads):
            raise ValueError(f"bad shapes unit_lse {tuple(unit_lse.shape)} lse {tuple(lse.shape)} "
                             f"for {kv_heads} KV heads")
    else:
        group = 1
        if heads != kv_heads:
            raise ValueError(f"block scores must be [B, {kv_heads}, NB], not {tuple(unit_lse.shape)}")
    if unit_lse.shape[0] != batch or counts.shape != (batch, kv_heads) or rows_mask.shape != (batch, kv_heads):
        raise ValueError("unit_lse, rows_mask, blocks and counts must share batch and KV heads")
    if copy_to is not None and (copy_to[0].shape != blocks.shape or copy_to[1].shape != counts.shape
                                or copy_to[0].dtype != torch.int32 or copy_to[1].dtype != torch.int32):
        raise ValueError("copy_to must be int32 blocks and counts shaped like blocks and counts")
    if unit_lse.dtype != torch.float32 or (lse is not None and lse.dtype != torch.float32):
        raise ValueError("unit_lse and lse must be float32")
    if blocks.dtype != torch.int32 or counts.dtype != torch.int32:
        raise ValueError("blocks and counts must be int32")
    if unit_lse.stride(-1) != 1:
        raise ValueError("unit_lse needs a contiguous last dimension")
    if num_blocks > MAX_BLOCKS:
        raise ValueError(f"the kernel takes at most {MAX_BLOCKS} blocks per row, not {num_blocks}")
    if not unit_lse.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 before importing triton")
    rows = batch * kv_heads
    if rows == 0:
        return
    if rows_mask.dtype == torch.bool:
        rows_mask = rows_mask.view(torch.uint8)
    lse_ptr, lse_stride = (lse, lse.stride()) if lse is not None else (unit_lse, (0, 0))
    nb_pad = max(16, triton.next_power_of_2(num_blocks))
    tokens_count = max(1, int(budget // block_size)) if mode == "tokens" else 0
    copy_blocks, copy_counts = copy_to if copy_to is not None else (blocks, counts)
    _select_blocks_kernel[(rows,)](
        unit_lse, lse_ptr, seq_lens, rows_mask, blocks, counts, copy_blocks, copy_counts,
        unit_lse.stride(0), unit_lse.stride(1), *lse_stride, *rows_mask.stride(), *blocks.stride(), *counts.stride(),
        *copy_blocks.stride(), *copy_counts.stride(),
        kv_heads, num_blocks, k_len, tokens_count, float(budget) if mode == "ratio" else 0.0,
        block_size, sink_blocks, local_blocks,
        G=group, NB_PAD=nb_pad, K_PAD=max(16, triton.next_power_of_2(max(k_len, 1))), HAS_LSE=lse is not None,
        AGG_SUM=aggregate == "sum", RATIO=mode == "ratio", SHARED_HEADS=kv_heads if share_heads else 0,
        CUDA=unit_lse.is_cuda, COPY=copy_to is not None,
        num_warps=num_warps or launch_warps(nb_pad), **pdl_launch(unit_lse.device),
    )
