"""The decode slots' host block tables, updated by changes, against a rebuild from the lists each step."""
import random

import numpy as np

from sparsedecode.engine.block_tables import BlockTables

SLOTS, MAX_BLOCKS = 8, 40


def rebuilt(rows: dict[int, list[int]], size: int) -> np.ndarray:
    tables = np.zeros((size, MAX_BLOCKS), dtype=np.int32)
    for slot, table in rows.items():
        tables[slot, : len(table)] = table
    return tables


def test_changes_applied_on_two_copies_give_the_rebuilt_tables_over_random_steps():
    """Tables extended in place, replaced by new lists (shorter, longer, same length with other blocks),
    slots reset, idle and reused: rank 0's copy and a worker's, which only applies rank 0's changes, both
    equal the tables rebuilt from the lists, step after step."""
    rng = random.Random(0)
    rank0, worker = BlockTables(SLOTS, MAX_BLOCKS), BlockTables(SLOTS, MAX_BLOCKS)
    lists: dict[int, list[int]] = {}
    sent = rebuilt_entries = 0
    for _ in range(2000):
        for slot in range(SLOTS):
            action = rng.random()
            if action < 0.05:
                lists.pop(slot, None)  # the sequence finished
            elif action < 0.12 or slot not in lists:  # a new sequence (a new list) takes the slot
                lists[slot] = [rng.randrange(1, 500) for _ in range(rng.randrange(0, MAX_BLOCKS // 2))]
                if rng.random() < 0.5:
                    rank0.reset(slot)
                    worker.reset(slot)
            elif action < 0.5 and len(lists[slot]) < MAX_BLOCKS:
                lists[slot].append(rng.randrange(1, 500))  # grows in place, as the block manager does
        active = {s: t for s, t in lists.items() if rng.random() < 0.8}
        if not active:
            continue
        size = max(active) + 1 + rng.randrange(0, SLOTS - max(active))
        changes = rank0.changes(list(active.items()))
        sent += sum(len(entries) for _, _, entries in changes)
        rebuilt_entries += sum(map(len, active.values()))
        for copy in (rank0, worker):
            copy.apply(changes, set(active), size)
            assert np.array_equal(copy.host[:size], rebuilt(active, size))
    # changes, not whole tables: far fewer entries than rebuilding every step converts
    assert sent < rebuilt_entries / 2


def test_a_new_list_with_the_same_length_is_copied_whole():
    tables = BlockTables(2, 8)
    first = [1, 2, 3]
    tables.apply(tables.changes([(0, first)]), {0}, 1)
    second = [4, 5, 6]  # a new sequence's table: same length, another list
    assert tables.changes([(0, second)]) == [(0, 0, [4, 5, 6])]
    first.append(9)
    assert tables.changes([(0, second)]) == []  # nothing changed in the list the slot holds


def test_only_appended_entries_travel():
    tables = BlockTables(1, 8)
    table = [3, 4]
    tables.apply(tables.changes([(0, table)]), {0}, 1)
    table += [5, 6]
    assert tables.changes([(0, table)]) == [(0, 2, [5, 6])]
