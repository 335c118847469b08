"""Where the blocks of one offloaded attention (or prefetch) call go in the staging pool: a pure function
of device tensors with fixed shapes, so that it runs inside a captured decode step, and on CUDA compiled
into a few fused kernels (`torch.compile`; eager it is about a hundred small ones per layer).

Per (decode row, KV head) the staging pool has P slots of one block: P - 1 cached slots, which hold
complete blocks, and the last, which holds the row's newest block. A call lists per row the logical
blocks it reads; `plan_staging` keeps the cached ones that are current (held, and their block not
written since they were moved), gives each missing complete block the least recently used slot this
call does not read (empty and stale slots first), and returns the moves (host slab -> staging slab)
that bring them, and the newest block's, for one launch of `kernels.gather_host_blocks`. A row that
reads more complete blocks than the cached slots, or a full row when the slots cannot hold a whole
row, is left to be read in place from host memory. See `cache` for the pool around it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

#: an int64 larger than any block id or tick: sorts after every real entry
LAST = 2**62
#: int64 values the staging pool keeps per slot (`held`, `held_writes`, `last_use`)
BOOKKEEPING_PER_SLOT = 3


def staging_pool_bytes(num_layers: int, rows: int, num_kv_heads: int, slots: int, block_size: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    """Device bytes of a staging pool of `rows` decode rows and `slots` blocks per (layer, row, KV head): the
    slots' K and V, and per slot its bookkeeping (block held, its write count, last read: int64 each), plus
    one tick counter per layer."""
    per_slot = 2 * block_size * head_dim * dtype.itemsize + BOOKKEEPING_PER_SLOT * torch.int64.itemsize
    return num_layers * (rows * num_kv_heads * slots * per_slot + torch.int64.itemsize)


def stages_full_rows(table_width: int, slots: int) -> bool:
    """Whether the staging pool holds a whole row (a full row's blocks, newest included) of a batch whose
    block tables are `table_width` wide; else full rows are read in place."""
    return table_width <= slots


def may_read_in_place(table_width: int, slots: int, list_width: int, has_full: bool) -> bool:
    """Whether a call with these shapes can leave any row to be read in place (a static property)."""
    return (has_full and not stages_full_rows(table_width, slots)) or list_width > slots - 1


class Staging(NamedTuple):
    """What `plan_staging` decided. Per entry of the sorted lists [B, H, W]: its logical block (`blocks`) and
    its slot (`entry_slots`: P where the entry is not staged; as int32 `slot_lists`, the op's unit lists
    over the staging pool). Per row [B, H]: how many staged entries lead its list (`staged_counts`),
    whether it is read in place (`in_place`) and how many blocks it reads (`visits`: a full row's are left
    to the caller). Per sequence [B]: its length in the staging pool (`staged_lens`: up to the newest
    block's last token in the last slot). The moves [M] (`src` host slabs, -1: none; `dst`
    staging slabs), the new bookkeeping (`held`, `held_writes`, `last_use` [B, H, P], the last column
    spare) and the counts (listed complete blocks, fetched ones, newest blocks moved) as a [3] tensor."""

    blocks: torch.Tensor
    entry_slots: torch.Tensor
    slot_lists: torch.Tensor
    staged_counts: torch.Tensor
    staged_lens: torch.Tensor
    in_place: torch.Tensor
    visits: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    held: torch.Tensor
    held_writes: torch.Tensor
    last_use: torch.Tensor
    counts: torch.Tensor


def plan_staging(tables: torch.Tensor, seq_lens: torch.Tensor, lists: torch.Tensor, counts: torch.Tensor,
                 full: torch.Tensor | None, held: torch.Tensor, held_writes: torch.Tensor, last_use: torch.Tensor,
                 tick: torch.Tensor, writes: torch.Tensor, block_size: int, sorted_lists: bool,
                 move_newest: bool) -> Staging:
    """Place one call's blocks. tables [B, MB], seq_lens [B]; lists [B, H, W] logical blocks with counts
    [B, H] (and full rows [B, H] or None) as the op takes them; held / held_writes / last_use [B, H, P] the
    bookkeeping of the call's layer (physical block or -1, its write count when moved, the tick of the
    last call that read it; the last column spare), tick the call's tick (0-dim, above every last_use),
    writes [NB] the layer's write counts per block. `sorted_lists`: the first `counts` entries of each
    list are unique, ascending and below the row's block count. `move_newest`: also move each row's newest
    block into its last slot when the row reads it (an attention call; a prefetch runs before the step's
    store, which changes that block)."""
    size, heads, slots = held.shape
    cached = slots - 1
    device = lists.device
    held_blocks = (seq_lens.long() + block_size - 1) // block_size
    table_width = tables.shape[1]
    if full is not None and stages_full_rows(table_width, slots):
        # A whole row fits the slots: a full row becomes the list of all its blocks, which the op reads as it
        # reads a full row (a list of the units 0..n-1 performs the same operations).
        width = max(lists.shape[-1], table_width)
        every = torch.arange(width, device=device).expand(size, heads, width)
        lists = torch.where(full[..., None], every, F.pad(lists, (0, width - lists.shape[-1]), value=-1))
        counts = torch.where(full, held_blocks[:, None], counts)
        full = None
    blocks = lists.long()
    valid = torch.arange(lists.shape[-1], device=device) < counts[..., None]
    if not sorted_lists:  # sort, drop what lies outside the row and repeats
        valid = valid & (blocks >= 0) & (blocks < held_blocks[:, None, None])
        blocks = torch.where(valid, blocks, LAST).sort(-1).values
        blocks = torch.where(F.pad(blocks[..., 1:] == blocks[..., :-1], (1, 0)), LAST, blocks).sort(-1).values
        valid = blocks < LAST
    newest = valid & (blocks == (held_blocks - 1)[:, None, None])
    others = valid & ~newest
    in_place = others.sum(-1) > cached
    if full is not None:
        in_place = in_place | full
    kept = ~in_place[..., None]
    staged, newest = others & kept, newest & kept

    # The staged complete blocks: hits among the current cached slots, the least recently used others
    # (never one this call reads) for the missing ones.
    phys = tables.long().gather(1, blocks.clamp(0, table_width - 1).flatten(1)).view_as(blocks)
    phys = torch.where(staged, phys, -2)  # -2 matches no slot (-1: empty)
    cached_held = held[..., :cached]
    current = (cached_held >= 0) & (held_writes[..., :cached] == writes[cached_held.clamp(min=0)])
    resident, order = torch.where(current, cached_held, -1).sort(-1)
    at = torch.searchsorted(resident, phys).clamp(max=cached - 1)
    hit = staged & (resident.gather(-1, at) == phys)
    miss = staged & ~hit
    hit_slots = torch.where(hit, order.gather(-1, at), cached)
    read = torch.zeros(size, heads, slots, dtype=torch.bool, device=device).scatter(-1, hit_slots, True)
    age = torch.where(read[..., :cached], LAST, torch.where(current, last_use[..., :cached], -1))
    victims = age.argsort(dim=-1, stable=True).gather(-1, (miss.cumsum(-1) - 1).clamp(0, cached - 1))
    entry_slots = torch.where(miss, victims, hit_slots)  # `cached` for entries not staged
    moved = torch.where(miss, victims, cached)
    new_held = held.scatter(-1, moved, phys)
    new_held_writes = held_writes.scatter(-1, moved, writes[phys.clamp(min=0)])
    new_last_use = last_use.scatter(-1, entry_slots, tick.expand_as(entry_slots))

    head = torch.arange(heads, device=device).view(1, heads, 1)
    first_slab = (torch.arange(size, device=device).view(size, 1, 1) * heads + head) * slots  # [B, H, 1]
    src = torch.where(miss, phys * heads + head, -1)
    dst = first_slab + entry_slots
    newest_rows = newest.any(-1, keepdim=True)
    if move_newest:
        newest_block = tables.long().gather(1, (held_blocks - 1).clamp(min=0)[:, None])[..., None]  # [B, 1, 1]
        src = torch.cat([src, torch.where(newest_rows, newest_block * heads + head, -1)], dim=-1)
        dst = torch.cat([dst, first_slab + cached], dim=-1)
    listed = staged | newest
    entry_slots = torch.where(listed, torch.where(newest, cached, entry_slots), slots)
    moved_newest = newest_rows.sum() if move_newest else torch.zeros((), dtype=torch.int64, device=device)
    tally = torch.stack([staged.sum(), miss.sum(), moved_newest])
    staged_lens = (cached * block_size + (seq_lens.long() - 1) % block_size + 1).to(torch.int32)
    return Staging(blocks, entry_slots, entry_slots.to(torch.int32), listed.sum(-1, dtype=torch.int32), staged_lens,
                   in_place, valid.sum(-1), src.flatten(), dst.flatten(), new_held, new_held_writes, new_last_use,
                   tally)
