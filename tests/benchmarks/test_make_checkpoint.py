"""Random checkpoints with real models' shapes: the shapes are the published ones, and a built one loads
and serves through the engine like any checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.make_checkpoint import FULL_DEPTH, SHAPES, build_checkpoint
from qllm_core import EngineConfig, SamplingParams
from qllm_core.engine_core import EngineCore
from tests.conftest import drain


def test_full_depth_shapes_have_the_published_sizes() -> None:
    # Parameter counts without the vocabulary, from the configs alone (no weights are made).
    olmoe = SHAPES["olmoe-1b-7b"](FULL_DEPTH["olmoe-1b-7b"])
    expert = 3 * olmoe.hidden_size * olmoe.intermediate_size
    assert olmoe.num_hidden_layers * olmoe.num_experts * expert == pytest.approx(6.44e9, rel=0.01)
    qwen = SHAPES["qwen1.5-moe-a2.7b"](FULL_DEPTH["qwen1.5-moe-a2.7b"])
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (60, 4, 1408)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_built_checkpoint_serves_through_the_engine(shape: str, tmp_path: Path) -> None:
    config = SHAPES[shape](2)
    # Shrunk in width so the test is quick; the family, routing and layout are the shape's own.
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 64, 4, 4
    config.intermediate_size = config.moe_intermediate_size = config.shared_expert_intermediate_size = 32
    path = build_checkpoint(config, tmp_path / shape, "cpu", "float32")
    core = EngineCore(EngineConfig(model=str(path), device="cpu", dtype="float32", granularity="expert"))
    core.add_request("r", list(range(3, 40)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "be")
    out = drain(core)["r"]
    assert len(out.token_ids) == 4
    assert core.model.adapter.model.config.num_experts == config.num_experts
