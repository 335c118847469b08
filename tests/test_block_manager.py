"""Block manager and scheduler invariants, without a model: allocation, prefix sharing with reference counts,
preemption, and no block leaked over many random requests."""
from __future__ import annotations

import random

import pytest

from sparsedecode import SamplingParams
from sparsedecode.engine.block_manager import BlockManager
from sparsedecode.engine.output_text import OutputText
from sparsedecode.engine.scheduler import Scheduler
from sparsedecode.engine.sequence import Sequence, SequenceStatus


def sequence(tokens: list[int], max_tokens: int = 8, rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens), seed=0, stop_ids=set(),
                    output_text=OutputText(None))


def check_counts(bm: BlockManager, holders: list[Sequence]) -> None:
    """Every block's reference count is the number of tables holding it; free blocks are held by none."""
    held: dict[int, int] = {}
    for seq in holders:
        for b in seq.block_table:
            held[b] = held.get(b, 0) + 1
    assert 0 not in held, "the null block was handed out"
    for b in range(1, bm.num_blocks):
        assert bm.ref_counts[b] == held.get(b, 0)
    assert sorted(bm.free_ids) == sorted(b for b in range(1, bm.num_blocks) if b not in held)


def test_allocate_grow_free():
    bm = BlockManager(num_blocks=9, block_size=4, enable_prefix_caching=False)
    a = sequence(list(range(10)))  # 3 blocks
    assert bm.allocate(a) and len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.ensure_slots(a, 12) and len(a.block_table) == 3  # still fits
    assert bm.ensure_slots(a, 13) and len(a.block_table) == 4
    b = sequence(list(range(17)))  # 5 blocks: only 4 free
    assert not bm.allocate(b) and b.block_table == [] and bm.num_free_blocks == 4
    assert not bm.ensure_slots(a, 4 * 9)  # nothing changes when it cannot grow
    assert len(a.block_table) == 4
    check_counts(bm, [a])
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_table == []
    check_counts(bm, [])


def test_prefix_sharing_counts_references_and_never_shares_the_last_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 114))  # 14 tokens: blocks 0-2 full, block 3 holds the last token
    a = sequence(prompt)
    assert bm.allocate(a) and a.num_cached_tokens == 0
    a.num_computed_tokens = len(prompt)
    bm.cache_full_blocks(a)
    b = sequence(prompt)  # same prompt: the 3 full blocks before the last token's block are reused
    assert bm.allocate(b)
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert b.num_cached_tokens == b.num_computed_tokens == 12
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 2, 1]
    c = sequence(prompt[:8] + [7, 7, 7, 7, 7])  # shares the first 2 blocks only
    assert bm.allocate(c) and c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]
    exact = sequence(prompt[:12])  # a prompt that ends a block: its last block is computed, not shared
    assert bm.allocate(exact) and exact.num_cached_tokens == 8
    check_counts(bm, [a, b, c, exact])
    for s in (a, b, c, exact):
        bm.free(s)
    check_counts(bm, [])
    # Freed blocks keep their prefix until handed out again: a later request still hits.
    d = sequence(prompt)
    assert bm.allocate(d) and d.num_cached_tokens == 12
    check_counts(bm, [d])


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    a, b = sequence(list(range(14))), sequence(list(range(14)))
    assert bm.allocate(a)
    a.num_computed_tokens = 14
    bm.cache_full_blocks(a)
    assert bm.allocate(b) and b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)


def drive(scheduler: Scheduler, rng: random.Random, finished: list[Sequence]) -> None:
    """One scheduler step without a model: pretend every chunk and decode step ran."""
    plan = scheduler.schedule(decode_steps=rng.choice([1, 2, 4]))
    for seq in plan.decodes:
        for _ in range(plan.decode_steps):
            seq.output_token_ids.append(rng.randrange(50))
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                scheduler.finish(seq, "length")
                finished.append(seq)
                break
        else:
            seq.num_computed_tokens = seq.num_tokens - 1
            scheduler.block_manager.cache_full_blocks(seq)
    for chunk in plan.prefills:
        seq = chunk.seq
        assert chunk.start == seq.num_computed_tokens and chunk.num_tokens > 0
        seq.num_computed_tokens += chunk.num_tokens
        scheduler.block_manager.cache_full_blocks(seq)
        if chunk.completes and not seq.output_token_ids:
            seq.output_token_ids.append(rng.randrange(50))
            if seq.params.max_tokens == 1:
                scheduler.finish(seq, "length")
                finished.append(seq)
    total = len(plan.decodes) + sum(c.num_tokens for c in plan.prefills)
    assert total <= scheduler.max_num_batched_tokens + len(plan.decodes)
    assert len(scheduler.running) <= scheduler.max_num_seqs
    slots = [s.slot for s in scheduler.running]
    assert len(set(slots)) == len(slots) and all(s is not None for s in slots)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_no_block_leaks_after_random_requests_aborts_and_preemptions(prefix_caching):
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=4, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=24)
    shared = [rng.randrange(50) for _ in range(16)]  # a common prefix, so blocks get shared
    finished: list[Sequence] = []
    preempted = 0
    for i in range(1000):
        prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(50) for _ in range(rng.randint(1, 30))]
        scheduler.add(sequence(prompt, max_tokens=rng.randint(1, 40), rid=str(i)))
        for _ in range(rng.randint(0, 3)):
            before = len(scheduler.waiting)
            drive(scheduler, rng, finished)
            preempted += len(scheduler.waiting) > before
        if rng.random() < 0.2 and scheduler.running:
            scheduler.finish(rng.choice(scheduler.running), "abort")
        if rng.random() < 0.05 and scheduler.waiting:
            scheduler.finish(rng.choice(list(scheduler.waiting)), "abort")
        check_counts(bm, scheduler.running)
    while scheduler.has_unfinished():
        drive(scheduler, rng, finished)
        check_counts(bm, scheduler.running)
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert sorted(scheduler.free_slots) == list(range(6))
    assert preempted > 0 and len(finished) > 300  # the run really exercised preemption and completion
    assert all(s.status is SequenceStatus.FINISHED and s.block_table == [] for s in finished)
