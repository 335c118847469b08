"""The decode slots' block tables on the host, updated by what changed since the last step.

A decode step needs the block table of every slot as one int32 array [slots, max_blocks]. Rebuilding it
from the sequences' lists each step converts every entry of every table again, and on a tensor-parallel
model the lists would travel to every worker too. The engine
only ever extends a sequence's table in place, or gives it a new list (allocation, free), so the rows
change by a few appended entries between steps.

`changes(rows)` (on the scheduling rank) compares each row's list with the one the slot last copied, by
identity, and returns per changed slot the first new index and the entries from there; `apply` writes
them (on every rank, from the same changes, so the arrays agree). A slot outside the rows is cleared to
the null block 0. `reset(slot)` forgets what a slot copied: the next change of the slot is its whole table.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: (slot, first index that changed, the table's entries from there)
TableChange = tuple[int, int, list[int]]


class BlockTables:
    def __init__(self, num_slots: int, max_blocks: int) -> None:
        self.host = np.zeros((num_slots, max_blocks), dtype=np.int32)
        self.lengths = [0] * num_slots  # entries written in each row (the rest is 0)
        # the list each slot last copied; held (not its id), so a new list can never pass for it
        self.sources: list[list[int] | None] = [None] * num_slots

    def reset(self, slot: int) -> None:
        self.sources[slot] = None

    def changes(self, slots_and_tables: Sequence[tuple[int, list[int]]]) -> list[TableChange]:
        """What `apply` needs to bring the given slots' rows to these tables."""
        out = []
        for slot, table in slots_and_tables:
            start = self.lengths[slot] if self.sources[slot] is table else 0
            if start > len(table):  # shrunk in place: copy it whole
                start = 0
            self.sources[slot] = table
            if start < len(table) or (start == 0 and self.lengths[slot]):
                out.append((slot, start, table[start:]))
        return out

    def apply(self, changes: list[TableChange], used_slots: set[int], size: int) -> None:
        """Write the changes; clear the rows of slots below `size` that are not in `used_slots`."""
        for slot, start, entries in changes:
            end = start + len(entries)
            self.host[slot, start:end] = entries
            if start == 0 and self.lengths[slot] > end:  # a shorter new table: clear the old tail
                self.host[slot, end : self.lengths[slot]] = 0
            self.lengths[slot] = end
        for slot in range(size):
            if slot not in used_slots and self.lengths[slot]:
                self.host[slot, : self.lengths[slot]] = 0
                self.lengths[slot] = 0
                self.sources[slot] = None
