"""Which sequences run in the next engine step, and how many tokens each.

A step decodes every running sequence whose prompt is in the pool (one token each, `decode_steps`
times in a row), and spends the rest of a per-step token budget on prefill chunks: first of sequences
already prefilling, then of waiting requests, admitted oldest first while a decode slot and the blocks
of their whole prompt are free. When a decoding sequence needs a block and none is free, the newest
running sequence is preempted: its blocks are freed and it waits at the front of the queue, to be
recomputed (its prompt and output so far, prefilled again).

With `whole_prefills` (a pool that prefills layer-major, `KVPool.layer_major_prefill`) a prefill is never
cut: one waiting request per step takes its whole prompt, whatever the budget.
"""
from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first position of the chunk
    num_tokens: int

    @property
    def completes(self) -> bool:
        """Whether the chunk computes the last token of the sequence's prefill."""
        return self.start + self.num_tokens == self.seq.prefill_target


@dataclass
class SchedulerOutput:
    decodes: list[Sequence] = field(default_factory=list)
    decode_steps: int = 0
    prefills: list[PrefillChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 whole_prefills: bool = False) -> None:
        self.block_manager = block_manager
        self.whole_prefills = whole_prefills
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.free_slots = list(range(max_num_seqs))  # a heap: the lowest slot first keeps batches dense
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, decode_steps: int) -> SchedulerOutput:
        out = SchedulerOutput()
        self._schedule_decodes(out, decode_steps)
        budget = self.max_num_batched_tokens - len(out.decodes)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.in_prefill:
                budget -= self._chunk(out, seq, budget)
        while self.waiting and (budget > 0 or self.whole_prefills) and self.free_slots and not out.preempted:
            seq = self.waiting[0]
            if not self.block_manager.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.slot = heapq.heappop(self.free_slots)
            self.running.append(seq)
            budget -= self._chunk(out, seq, budget)
            if self.whole_prefills:
                break
        return out

    def _schedule_decodes(self, out: SchedulerOutput, decode_steps: int) -> None:
        decoding = [s for s in self.running if not s.in_prefill]
        if not decoding:
            return
        # No sequence runs past its max_tokens inside the steps taken without looking at the tokens.
        steps = min(decode_steps, *(s.params.max_tokens - len(s.output_token_ids) for s in decoding))
        for seq in decoding:  # oldest first; preemption takes the newest
            while seq.status is SequenceStatus.RUNNING and not self.block_manager.ensure_slots(seq, seq.num_tokens - 1 + steps):
                self.preempt(self.running[-1], out)
            if seq.status is SequenceStatus.RUNNING:
                out.decodes.append(seq)
        out.decode_steps = steps if out.decodes else 0

    def _chunk(self, out: SchedulerOutput, seq: Sequence, budget: int) -> int:
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.perf_counter()
        n = seq.prefill_target - seq.num_computed_tokens
        if not self.whole_prefills:
            n = min(n, budget)
        out.prefills.append(PrefillChunk(seq, seq.num_computed_tokens, n))
        return n

    def preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running or waiting sequence: free its blocks and slot."""
        if seq.status is SequenceStatus.RUNNING:
            self._release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        heapq.heappush(self.free_slots, seq.slot)
        seq.slot = None
