"""The offloaded pool's staging under pressure: tiny staging pools, random selections that keep part of
the previous one, prefetches of other lists, sequences replaced by new ones in freed blocks. Every
attention call must give the on-device pool's results, which it cannot if a block it reads was evicted
or overwritten (by its own moves, a prefetch's, or a store) before the op read it. On a GPU the same
runs with the pool in mapped host memory and the prefetches on the copy stream."""
from __future__ import annotations

import pytest
import torch

from sparsedecode.core import DecodeBatch, KVPool
from sparsedecode.offload import OffloadConfig, OffloadedKVPool

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
LAYERS, NUM_BLOCKS, KV_HEADS, BLOCK, DIM, HEADS, ROWS = 2, 64, 2, 16, 16, 4, 4


def assert_same(device: str, want: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...]) -> None:
    """Outputs, lse and block scores equal: bit for bit on CUDA (the kernel visits the staged blocks in the
    device pool's order), up to rounding on the CPU (its reference sums over another layout)."""
    for a, b in zip(want, got, strict=True):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        seen = torch.isfinite(a)
        assert torch.equal(a[seen], b[seen]) if device == "cuda" else torch.allclose(a[seen], b[seen], atol=1e-5)


def sticky_lists(gen: torch.Generator, previous: torch.Tensor, held: torch.Tensor, width: int,
                 keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row `width` distinct blocks below its `held`, each kept from `previous` with probability `keep`
    (when it is still there), else drawn at random; ascending, padded with 10**6 (past every table)."""
    rows, heads = previous.shape[:2]
    lists = torch.full((rows, heads, width), 10**6, dtype=torch.int32)
    counts = torch.zeros(rows, heads, dtype=torch.int32)
    for b in range(rows):
        n = min(width, int(held[b]))
        for h in range(heads):
            kept = [int(x) for x in previous[b, h] if x < held[b] and torch.rand(1, generator=gen) < keep]
            fresh = torch.randperm(int(held[b]), generator=gen).tolist()
            chosen = list(dict.fromkeys(kept + fresh))[:n]
            lists[b, h, :n] = torch.tensor(sorted(chosen), dtype=torch.int32)
            counts[b, h] = n
    return lists, counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool_blocks,width,compiled", [
    (5, 4, False), (7, 6, False), (9, 6, False),
    pytest.param(7, 6, True, marks=pytest.mark.slow),  # the bookkeeping through torch.compile, as on CUDA engines
])
def test_tiny_staging_pool_never_loses_a_block_in_use(device: str, pool_blocks: int, width: int,
                                                      compiled: bool) -> None:
    gen = torch.Generator().manual_seed(pool_blocks * 10 + width)
    max_blocks = 10
    shape = (LAYERS, NUM_BLOCKS, KV_HEADS, BLOCK, DIM, torch.float32, device)
    device_pool = KVPool(*shape)
    pool = OffloadedKVPool(*shape, config=OffloadConfig(index="gpu", pool_blocks=pool_blocks), compiled=compiled)
    pool.reserve(99)
    assert pool.pool_blocks == pool_blocks
    free = torch.randperm(NUM_BLOCKS - 1, generator=gen).add(1).tolist()  # block 0 is the null block
    tables = torch.zeros(ROWS, max_blocks, dtype=torch.int32)
    lengths = [0] * ROWS
    previous = torch.full((ROWS, KV_HEADS, width), 10**6, dtype=torch.int32)

    def start(row: int, length: int) -> None:
        """A new sequence of `length` tokens in `row`, in blocks taken from the free list."""
        free.extend(b for b in tables[row].tolist() if b)
        tables[row] = torch.tensor([free.pop() for _ in range(max_blocks)], dtype=torch.int32)  # freed ones first
        lengths[row] = length
        positions = torch.arange(length)
        ids, offsets = tables[row].long()[positions // BLOCK], positions % BLOCK
        for layer in range(LAYERS):
            k, v = (torch.randn(length, KV_HEADS, DIM, generator=gen).to(device) for _ in range(2))
            for p in (device_pool, pool):
                p.store(layer, ids.to(device), offsets.to(device), k, v)

    for row, length in enumerate([100, 60, 130, 0]):  # row 3 idle: the null block, length 1
        if length:
            start(row, length)
    for step in range(24):
        if step in (8, 16):  # a sequence ends; a new one reuses freed blocks with new K/V
            start(step // 8 - 1, 70 + step)
        positions = torch.tensor(lengths)
        seq_lens = (positions + 1).to(torch.int32)
        batch = DecodeBatch(tables.to(device), seq_lens.to(device), torch.zeros(ROWS, dtype=torch.int32, device=device))
        store_ids = tables.long().gather(1, (positions // BLOCK)[:, None]).squeeze(1)
        held = -(-seq_lens // BLOCK)
        for layer in range(LAYERS):
            k, v = (torch.randn(ROWS, KV_HEADS, DIM, generator=gen).to(device) for _ in range(2))
            for p in (device_pool, pool):
                p.store(layer, store_ids.to(device), (positions % BLOCK).to(device), k, v)
            q = torch.randn(ROWS, HEADS, DIM, generator=gen).to(device)
            previous, counts = sticky_lists(gen, previous, held, width, keep=0.7)
            lists, counts = previous.to(device), counts.to(device)
            want_scores = torch.empty(ROWS, HEADS, max_blocks, device=device)
            scores = torch.empty_like(want_scores)
            out, lse = device_pool.attention(layer, q, batch, 0.25, BLOCK, lists, counts, None, want_scores,
                                             sorted_lists=True)
            got_out, got_lse = pool.attention(layer, q, batch, 0.25, BLOCK, lists, counts, None, scores,
                                              sorted_lists=True)
            assert_same(device, (out, lse, want_scores), (got_out, got_lse, scores))
            if layer + 1 < LAYERS:  # before the next layer stores this step's token
                pool.prefetch(layer + 1, batch, *(x.to(device) for x in sticky_lists(gen, previous, held, width, 0.5)))
        lengths = [n + 1 for n in lengths[:3]] + [0]
    moved = pool.transfer_counts()
    assert moved.listed > moved.fetched > 0 and moved.prefetched > 0 and moved.in_place == 0
    assert 0.2 < moved.hit_rate < 1 and moved.newest > 0


@pytest.mark.parametrize("device", DEVICES)
def test_rows_longer_than_the_staging_pool_are_read_in_place(device: str) -> None:
    """Full rows of a context longer than the staging pool, and lists longer than its slots, next to
    staged rows: the in-place rows give the device pool's results (up to the op's rounding) and are
    counted as read in place."""
    gen = torch.Generator().manual_seed(3)
    max_blocks = 12
    shape = (1, NUM_BLOCKS, KV_HEADS, BLOCK, DIM, torch.float32, device)
    device_pool = KVPool(*shape)
    pool = OffloadedKVPool(*shape, config=OffloadConfig(index="gpu", pool_blocks=4))
    pool.reserve(99)
    tables = torch.arange(1, 1 + ROWS * max_blocks, dtype=torch.int32).view(ROWS, max_blocks)
    seq_lens = torch.tensor([150, 90, 40, 170], dtype=torch.int32)
    for b in range(ROWS):
        positions = torch.arange(int(seq_lens[b]))
        k, v = (torch.randn(len(positions), KV_HEADS, DIM, generator=gen).to(device) for _ in range(2))
        ids, offsets = tables[b].long()[positions // BLOCK], positions % BLOCK
        for p in (device_pool, pool):
            p.store(0, ids.to(device), offsets.to(device), k, v)
    batch = DecodeBatch(tables.to(device), seq_lens.to(device), torch.zeros(ROWS, dtype=torch.int32, device=device))
    lists = torch.tensor([[0, 3, 5, 7, 9], [1, 2, 4, 5, 0]], dtype=torch.int32)[None].repeat(ROWS, 1, 1)
    counts = torch.tensor([[5, 3]] * ROWS, dtype=torch.int32)  # row (b, 0): 5 blocks, more than the 3 slots
    full = torch.tensor([[False, False], [True, False], [False, False], [False, True]])
    q = torch.randn(ROWS, HEADS, DIM, generator=gen).to(device)
    want_scores, scores = (torch.empty(ROWS, HEADS, max_blocks, device=device) for _ in range(2))
    args = (lists.to(device), counts.to(device), full.to(device))
    out, lse = device_pool.attention(0, q, batch, 0.25, BLOCK, *args, want_scores)
    got_out, got_lse = pool.attention(0, q, batch, 0.25, BLOCK, *args, scores)
    assert_same("cpu", (out, lse, want_scores), (got_out, got_lse, scores))  # in place: the op's rounding
    moved = pool.transfer_counts()
    # held blocks 10, 6, 3, 11. In place: (0, 0) 5 listed blocks, (1, 0) full 6, (3, 0) 5 listed (its newest
    # not among them), (3, 1) full 11. Staged: (0, 1) and (1, 1) blocks 1, 2, 4; (2, 0) block 0; (2, 1) block 1
    # and its newest, 2.
    assert (moved.in_place, moved.listed, moved.newest) == (5 + 6 + 5 + 11, 3 + 3 + 1 + 1, 1)
