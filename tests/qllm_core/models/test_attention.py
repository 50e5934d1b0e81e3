"""The decode layout built from block tables addresses the same slots as the per-position slot map."""

from __future__ import annotations

import torch

from qllm_core.cache import KVCache, KVLayout
from qllm_core.models.attention import AttentionBatch


def _pool_with(lengths: dict[str, int]) -> KVCache:
    kv = KVCache(KVLayout.uniform(1, 1, 2), 32, 4, torch.float32, torch.device("cpu"))
    # Interleaved growth, so that block tables are not contiguous runs.
    for step in range(1, max(lengths.values()) + 1):
        for rid, n in lengths.items():
            kv.allocate(rid, min(step, n))
    return kv


def test_decode_layout_matches_the_slot_map() -> None:
    lengths = {"a": 9, "b": 1, "c": 16}  # context lengths, the new token included
    kv = _pool_with(lengths)
    rids = list(lengths)
    batch = AttentionBatch.for_decode(kv, rids, [lengths[r] - 1 for r in rids])
    assert batch.decode_slots is not None and batch.decode_mask is not None
    assert batch.decode_slots.shape == (3, 16)
    for row, rid in enumerate(rids):
        n = lengths[rid]
        assert batch.decode_slots[row, :n].tolist() == kv.slots(rid, 0, n).tolist()
        assert batch.write_slots[row].item() == kv.slots(rid, n - 1, n).item()
        assert batch.decode_mask[row, 0, 0].tolist() == [i < n for i in range(16)]


def test_equal_contexts_need_no_mask_and_the_window_mask_keeps_the_last_positions() -> None:
    lengths = {"a": 7, "b": 7}
    kv = _pool_with(lengths)
    batch = AttentionBatch.for_decode(kv, ["a", "b"], [6, 6])
    assert batch.decode_mask is None
    window = batch.window_mask(3)
    assert window.shape == (2, 1, 1, 7)
    assert window[0, 0, 0].tolist() == [False, False, False, False, True, True, True]


def test_block_tables_are_padded_per_row() -> None:
    kv = _pool_with({"a": 9, "b": 2})
    tables = kv.block_tables(["a", "b"])
    assert tables.shape == (2, 3)
    assert tables[1, 1:].tolist() == [0, 0]  # padding: block 0, masked out by the decode layout
