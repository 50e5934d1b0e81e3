"""Expert spans: how a layer's routed experts are cut into steps, and that running them span by span
gives the experts module's own output."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from qllm_core.models.attention import ATTENTION_NAME
from qllm_core.models.builtin import ensure_builtin
from qllm_core.models.registry import experts_implementation, stage_model
from qllm_core.models.staged import LayerWork, StagedModel, batched_experts, split_experts


def _tiny(dtype: torch.dtype) -> StagedModel:
    """The built-in tiny model in stages, loaded as the engine loads it."""
    model = AutoModelForCausalLM.from_pretrained(
        ensure_builtin("tiny"),
        dtype=dtype,
        attn_implementation=ATTENTION_NAME,
        experts_implementation=experts_implementation(dtype),
    ).eval()
    return stage_model(model, "mixtral", grouped=experts_implementation(dtype) is None)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=70), st.integers(1, 10))
def test_spans_cover_each_hit_expert_once_in_at_most_units_steps(sizes: list[int], units: int) -> None:
    ranges = split_experts(sizes, units)
    hit = [e for e, n in enumerate(sizes) if n]
    covered = [e for first, end in ranges for e in range(first, end) if sizes[e]]
    assert covered == hit
    assert len(ranges) <= units
    assert all(sizes[first] and sizes[end - 1] for first, end in ranges), "a span starts and ends on a hit"
    assert all(a_end <= b_first for (_, a_end), (b_first, _) in itertools.pairwise(ranges))
    if len(hit) <= units:
        assert ranges == [(e, e + 1) for e in hit]


def test_spans_are_about_equal_in_rows() -> None:
    # 64 experts, 8 units, rows 1..64: each span holds about an eighth of the rows (one expert over).
    sizes = list(range(1, 65))
    ranges = split_experts(sizes, 8)
    assert len(ranges) == 8
    share = sum(sizes) / 8
    assert all(sum(sizes[a:b]) < share + max(sizes[a:b]) for a, b in ranges)


@pytest.mark.parametrize(
    ("dtype", "units"), [(torch.float64, 3), (torch.float64, 8), (torch.float32, 3), (torch.float32, 8)]
)
def test_span_by_span_equals_the_experts_module(dtype: torch.dtype, units: int) -> None:
    """Spans of several experts run grouped_mm (float32), spans of one expert and float64 the eager loop's
    arithmetic; either way the layer's output is the experts module's."""
    staged = _tiny(dtype)
    torch.manual_seed(0)
    hidden = torch.randn(37, staged.adapter.config.hidden_size, dtype=dtype)
    with torch.inference_mode():
        work = staged.route(1, hidden, units)
        assert 1 <= len(work.spans) <= units
        assert all((span.offsets is None) == (span.end - span.first == 1) for span in work.spans)
        whole = LayerWork(work.parts, work.residual, work.normed, work.top_k_index, work.top_k_weights, work.normed)
        staged.all_experts(1, whole)
        while work.spans:
            staged.expert_span(1, work)
    if dtype == torch.float64:  # the eager loop's arithmetic, in its order: bit for bit
        assert torch.equal(work.out, whole.out)
    else:  # grouped_mm over a span rounds a little differently from over the whole layer
        torch.testing.assert_close(work.out, whole.out, rtol=1e-5, atol=1e-5)


def test_batched_cpu_kernel_computes_the_experts_module_and_steps_aside_when_it_would_not_pay() -> None:
    staged = _tiny(torch.float32)
    moe = staged.parts[1].moe
    assert moe is not None
    hidden_size = staged.adapter.config.hidden_size
    torch.manual_seed(0)
    with torch.inference_mode():
        normed = torch.randn(16, hidden_size)
        weights = torch.rand(16, 2)
        every_expert = torch.stack([torch.arange(16) % 8, (torch.arange(16) + 3) % 8], dim=1)  # 4 rows each
        out = batched_experts(moe.kernel, normed, every_expert, weights)
        assert out is not None
        torch.testing.assert_close(out, moe.experts(normed, every_expert, weights), rtol=1e-5, atol=1e-5)
        # Expert 7 has no rows: its weights would be read for nothing.
        assert batched_experts(moe.kernel, normed, every_expert % 7, weights) is None
        # Over 32 rows for an expert: grouped_mm is as fast.
        many = torch.randn(160, hidden_size)
        crowded = torch.stack([torch.arange(160) % 8, (torch.arange(160) + 1) % 8], dim=1)
        assert batched_experts(moe.kernel, many, crowded, torch.rand(160, 2)) is None
