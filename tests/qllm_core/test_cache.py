"""The KV pool hands out blocks, takes them back, and keeps its books balanced."""

from __future__ import annotations

import pytest
import torch

from qllm_core.cache import KVAccountingError, KVCache, KVLayout


def _pool(blocks: int = 8) -> KVCache:
    return KVCache(KVLayout.uniform(2, 1, 4), blocks, 4, torch.float32, torch.device("cpu"))


def test_allocate_grow_and_free() -> None:
    kv = _pool()
    kv.allocate("a", 5)  # 2 blocks
    kv.allocate("b", 4)  # 1 block
    assert (kv.free_blocks, kv.used_blocks) == (5, 3)
    kv.allocate("a", 9)  # grows to 3 blocks
    assert kv.extra_blocks("a", 12) == 0 and kv.extra_blocks("a", 13) == 1
    slots = kv.slots("a", 0, 9).tolist()
    assert len(set(slots)) == 9 and kv.slots("a", 4, 5).tolist() == [slots[4]]
    assert kv.free("a") == 3 and kv.free("a") == 0
    assert (kv.free_blocks, kv.used_blocks) == (7, 1)
    kv.audit()


def test_overallocation_is_refused_with_counts() -> None:
    kv = _pool(2)
    with pytest.raises(KVAccountingError, match="needs 3 blocks but only 2 are free"):
        kv.allocate("a", 12)
    kv.audit()


def test_broken_books_are_reported_with_counts() -> None:
    kv = _pool(4)
    kv.allocate("a", 4)
    kv._free.append(kv._tables["a"][0])  # simulate a double free
    with pytest.raises(KVAccountingError, match=r"free=4 \+ used=1 != total=4"):
        kv.check()


def test_audit_recounts_the_tables_behind_the_used_count() -> None:
    kv = _pool(4)
    kv.allocate("a", 4)
    kv._free.pop()  # a block lost from the free list but booked as used: the two books still balance,
    kv._used += 1  # so only a recount of the tables finds it
    kv.check()
    with pytest.raises(KVAccountingError, match="the tables hold 1 blocks but used=2"):
        kv.audit()


@pytest.mark.parametrize(("start", "end"), [(0, 1), (3, 7), (0, 300), (5, 400), (131, 400), (399, 400)])
def test_slots_follow_the_block_table_for_short_and_long_ranges(start: int, end: int) -> None:
    kv = KVCache(KVLayout.uniform(1, 1, 4), 200, 4, torch.float32, torch.device("cpu"))
    kv.allocate("other", 10)  # so the request's blocks are not 0, 1, 2, ...
    kv.allocate("r", 400)
    table = kv.slots("r", 0, 400).tolist()
    # Position p lives at offset p % block_size of its block; blocks are whole and distinct.
    assert all(table[p] % 4 == p % 4 and table[p] - p % 4 == table[p - p % 4] for p in range(400))
    assert len(set(table)) == 400
    assert kv.slots("r", start, end).tolist() == table[start:end]
