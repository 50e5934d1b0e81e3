"""The padded attention of a mixed pass (prompts, chunks and decodes in one batch) equals attending each
sequence alone, with sliding windows, attention sinks, grouped heads and keys wider than values."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from qllm_core.cache import KVCache, KVLayout
from qllm_core.models.attention import WINDOW, AttentionBatch, paged_attention

HEADS, KV_HEADS, K_DIM, V_DIM = 4, 2, 8, 6
# (request, first new position, new tokens): a prompt from 0, a chunk after 5 cached tokens, decodes of
# unequal contexts and a one-token prompt.
RUNS = [("prompt", 0, 7), ("dec-a", 9, 1), ("chunk", 5, 4), ("dec-b", 3, 1), ("one", 0, 1)]
# Two prompts of one shape, decodes of near contexts (padded together) and a chunk.
LIKE = [("p0", 0, 4), ("d0", 8, 1), ("p1", 0, 4), ("d1", 9, 1), ("c", 4, 3), ("d2", 7, 1)]


def _pool(runs: list[tuple[str, int, int]], dtype: torch.dtype) -> KVCache:
    kv = KVCache(KVLayout.uniform(1, KV_HEADS, K_DIM, V_DIM), 16, 4, dtype, torch.device("cpu"))
    for step in range(1, 17):  # interleaved growth: block tables are not contiguous runs
        for rid, start, n in runs:
            kv.allocate(rid, min(step, start + n))
    return kv


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, window: int | None, sinks: torch.Tensor | None
) -> torch.Tensor:
    """One sequence alone, in float64: q (H, n, d), k (Hkv, context, dk), v (Hkv, context, dv) -> (n, H, dv)."""
    q, k, v = q.double(), k.double().repeat_interleave(2, 0), v.double().repeat_interleave(2, 0)
    scores = q @ k.transpose(-1, -2) * K_DIM**-0.5
    q_pos = torch.arange(context - q.shape[1], context)[:, None]
    k_pos = torch.arange(context)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= q_pos - k_pos < window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().reshape(-1, 1, 1).expand(-1, q.shape[1], 1)], dim=-1)
    probs = scores.softmax(-1)[..., :context]
    return (probs @ v).transpose(0, 1)


def _module(window: int | None) -> nn.Module:
    module = nn.Module()
    module.layer_idx = 0  # type: ignore[assignment]
    setattr(module, WINDOW, window)
    return module


def _mixed_attention(runs: list[tuple[str, int, int]], window: int | None, with_sinks: bool) -> None:
    torch.manual_seed(0)
    kv = _pool(runs, torch.float32)
    n = sum(r[2] for r in runs)
    # Earlier positions' K/V already in the pool, as earlier passes left them.
    kv.k[0].normal_()  # type: ignore[union-attr]
    kv.v[0].normal_()  # type: ignore[union-attr]
    query, key, value = (
        torch.randn(1, HEADS, n, K_DIM),
        torch.randn(1, KV_HEADS, n, K_DIM),
        torch.randn(1, KV_HEADS, n, V_DIM),
    )
    sinks = torch.randn(HEADS) if with_sinks else None
    batch = AttentionBatch.for_runs(kv, runs)
    extra: dict[str, Any] = {"s_aux": sinks} if sinks is not None else {}
    out, _ = paged_attention(_module(window), query, key, value, None, K_DIM**-0.5, qllm_batch=batch, **extra)
    assert out.shape == (1, n, HEADS, V_DIM) and out.is_contiguous()
    offset = 0
    for rid, start, length in runs:
        context = start + length
        slots = kv.slots(rid, 0, context)
        k = kv.k[0].index_select(0, slots).transpose(0, 1)  # type: ignore[union-attr]
        v = kv.v[0].index_select(0, slots).transpose(0, 1)  # type: ignore[union-attr]
        expected = _reference(query[0, :, offset : offset + length], k, v, context, window, sinks)
        torch.testing.assert_close(out[0, offset : offset + length].double(), expected, atol=2e-5, rtol=1e-5)
        offset += length


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_a_mixed_pass_attends_like_each_sequence_alone(window: int | None, with_sinks: bool) -> None:
    _mixed_attention(RUNS, window, with_sinks)


@pytest.mark.parametrize(
    "runs",
    [
        [("p", 0, 6)],  # one prompt: SDPA's own causal mask
        [("a", 0, 5), ("b", 0, 3)],  # prompts of unequal length: padded queries and keys
        [("a", 4, 1), ("b", 4, 1)],  # decodes of equal context: no mask at all
        [("a", 2, 3), ("b", 6, 1)],  # one chunk and one decode: two groups
        LIKE,
    ],
)
def test_every_layout_attends_like_each_sequence_alone(runs: list[tuple[str, int, int]]) -> None:
    _mixed_attention(runs, None, False)
    _mixed_attention(runs, 2, False)


def test_like_sequences_share_one_call_whose_masks_are_built_once() -> None:
    batch = AttentionBatch.for_runs(_pool(LIKE, torch.float32), LIKE)
    shapes = sorted((g.num_seqs, g.query_len, g.context_len) for g in batch.groups)
    assert shapes == [(1, 3, 7), (2, 4, 4), (3, 1, 10)]
    decodes = next(g for g in batch.groups if g.query_len == 1)
    assert decodes.mask(None) is decodes.mask(None)  # the second layer reuses the first one's mask
    assert decodes.mask(3) is not decodes.mask(None)
    prompts = next(g for g in batch.groups if g.num_seqs == 2)
    assert prompts.causal and prompts.mask(None) is None  # SDPA's causal kernel, no mask


def test_the_new_tokens_k_and_v_land_in_their_slots() -> None:
    kv = _pool(RUNS, torch.float32)
    n = sum(r[2] for r in RUNS)
    key, value = torch.randn(1, KV_HEADS, n, K_DIM), torch.randn(1, KV_HEADS, n, V_DIM)
    batch = AttentionBatch.for_runs(kv, RUNS)
    paged_attention(_module(None), torch.randn(1, HEADS, n, K_DIM), key, value, None, None, qllm_batch=batch)
    assert torch.equal(kv.k[0].index_select(0, batch.write_slots), key[0].transpose(0, 1))  # type: ignore[union-attr]
    assert torch.equal(kv.v[0].index_select(0, batch.write_slots), value[0].transpose(0, 1))  # type: ignore[union-attr]
