"""The index half of the decode-attention op: exact per-block scores from the keys alone.

`block_lse` fills the same `unit_lse` and returns the same `lse` as `sparse_decode_attention` with
`unit_lse` (up to rounding), but reads only keys and writes no attention output. Plain vectorised torch
on whatever device the keys are on, static `[B, Hkv, T, D]` or a paged pool read through block tables:
over the pool's keys in pinned host memory it is the CPU index of KV offload (threads:
`OffloadConfig.cpu_threads`, through `torch_threads`); the index-time benchmark runs it on both sides.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..kernels.reference import gather_blocks, visible_tokens

FULL_SCAN_TOKENS = 1 << 14  # keys per slice of a full scan: bounds the float32 temporaries


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """PyTorch's CPU threads set to `count` inside the block and restored after (the setting is
    global); nothing is changed when `count` is None or already the setting."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def block_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    unit_size: int,
    unit_lists: torch.Tensor | None,
    unit_counts: torch.Tensor | None,
    full_rows: torch.Tensor | None,
    unit_lse: torch.Tensor,
    block_tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D]; k: [B, Hkv, T, D], or with `block_tables` [B, MB] a paged pool [NB, Hkv, unit_size, D]
    (one unit a block, T = MB * unit_size); lists/counts/full_rows as in the op (no lists: all rows full).
    Writes unit_lse [B, Hq, T // unit_size] (-inf for units not visited) and returns lse [B, Hq] over
    the visited units. Full rows scan every key below their length; list rows gather their units."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if block_tables is None:
        num_units = k.shape[2] // unit_size
    elif k.shape[2] == unit_size:
        num_units = block_tables.shape[1]
    else:
        raise ValueError(f"a paged pool of blocks of {k.shape[2]} tokens is scored in units of its blocks, "
                         f"not {unit_size}")
    group = num_heads // num_kv_heads
    qg = q.float().view(batch, num_kv_heads, group, head_dim) * scale
    lens = seq_lens.long().view(batch, 1, 1, 1)
    units_held = -(-seq_lens.long() // unit_size)
    out = unit_lse.view(batch, num_kv_heads, group, num_units)
    if unit_lists is None or (full_rows is not None and bool(full_rows.any())):
        # A full scan, sliced so that the float copy of the keys stays small.
        end = int(units_held.max()) * unit_size
        out.fill_(float("-inf"))
        for start in range(0, end, FULL_SCAN_TOKENS):
            stop = min(start + FULL_SCAN_TOKENS, end)
            if block_tables is None:
                keys = k[:, :, start:stop]
            else:
                keys = gather_blocks(k, block_tables[:, start // unit_size : stop // unit_size])
            scores = torch.einsum("bhgd,bhtd->bhgt", qg, keys.float())
            pos = torch.arange(start, stop, device=q.device)
            scores = scores.masked_fill(pos >= lens, float("-inf"))
            out[..., start // unit_size : stop // unit_size] = scores.unflatten(-1, (-1, unit_size)).logsumexp(-1)
        if unit_lists is not None:  # a mixed call: list rows keep only their units
            visited = visible_tokens(units_held, num_units, 1, unit_lists, unit_counts, full_rows, num_kv_heads)
            out.masked_fill_(~visited[:, :, None, :], float("-inf"))
    else:
        slots = torch.arange(unit_lists.shape[-1], device=q.device)
        units = unit_lists.long()
        listed = (slots < unit_counts[..., None]) & (units >= 0) & (units < units_held.view(batch, 1, 1))
        units = torch.where(listed, units, 0)
        rows_b = torch.arange(batch, device=q.device)[:, None, None]
        rows_h = torch.arange(num_kv_heads, device=q.device)[None, :, None]
        if block_tables is None:
            keys = k.view(batch, num_kv_heads, num_units, unit_size, head_dim)[rows_b, rows_h, units]
        else:
            keys = k[block_tables.long()[rows_b, units], rows_h]
        scores = torch.einsum("bhgd,bhcud->bhgcu", qg, keys.float())
        pos = units[..., None] * unit_size + torch.arange(unit_size, device=q.device)  # [B, Hkv, C, U]
        scores = scores.masked_fill((pos[:, :, None] >= lens[..., None]) | ~listed[:, :, None, :, None], float("-inf"))
        per_unit = scores.logsumexp(-1)  # [B, Hkv, G, C]
        # Scatter through one spare column: unlisted slots land there; duplicates write equal values.
        spread = torch.full((batch, num_kv_heads, group, num_units + 1), float("-inf"), device=q.device)
        target = torch.where(listed, units, num_units)[:, :, None, :].expand_as(per_unit)
        spread.scatter_(-1, target, per_unit)
        out.copy_(spread[..., :num_units])
    return out.logsumexp(-1).view(batch, num_heads)
