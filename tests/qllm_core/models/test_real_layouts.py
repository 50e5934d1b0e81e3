"""Qwen3.5-MoE and Gemma 4 as they are released: multimodal checkpoints (`*ForConditionalGeneration`, the
decoder's settings in `text_config`), built tiny from the real models' config fields and loaded from a
directory as a user would. The engine serves the text decoder, token for token transformers' own."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.models.gemma4 import Gemma4Config, Gemma4ForConditionalGeneration
from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

from qllm_core import EngineConfig, SamplingParams
from qllm_core.engine_core import EngineCore
from tests.conftest import DEVICE, VOCAB, drain, save_tiny

PROMPTS = ([5, 17, 99, 250, 3, 3, 42], list(range(20, 60)))
MAX_NEW = 10
Reference = Callable[..., list[int]]
_SMALL = dict(vocab_size=VOCAB, hidden_size=48, max_position_embeddings=512, eos_token_id=0, pad_token_id=0)

# Qwen3.6-35B-A3B's text_config, shrunk: three Gated DeltaNet layers to one gated full-attention layer, a
# shared expert, partial rotary embedding, a multi-token-prediction head the causal LM leaves out.
QWEN3_5_MOE_TEXT = dict(
    _SMALL,
    num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    attn_output_gate=True,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=12,
    linear_value_head_dim=12,
    linear_conv_kernel_dim=4,
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    mtp_num_hidden_layers=1,
    tie_word_embeddings=False,
)
# Gemma 4 26B-A4B's text_config, shrunk: sliding layers and a full-attention layer whose keys are its
# values (attention_k_eq_v) with KV of another shape, the MoE block beside the dense MLP, soft-capped logits.
GEMMA4_TEXT = dict(
    _SMALL,
    num_hidden_layers=3,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    sliding_window=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    attention_k_eq_v=True,
    intermediate_size=64,
    enable_moe_block=True,
    num_experts=6,
    top_k_experts=2,
    moe_intermediate_size=32,
    hidden_size_per_layer_input=0,
    final_logit_softcapping=30.0,
    tie_word_embeddings=True,
)


def _served_as_transformers_serves_it(path: Path, reference: Reference) -> EngineCore:
    core = EngineCore(EngineConfig(model=str(path), dtype="float64", device=DEVICE, granularity="expert"))
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        core.add_request(f"r{i}", prompt, params, "ls")
    finals = drain(core)
    for i, prompt in enumerate(PROMPTS):
        assert list(finals[f"r{i}"].token_ids) == reference(path, torch.float64, prompt, MAX_NEW), f"prompt {i}"
    return core


def test_a_released_qwen3_5_moe_checkpoint_serves_its_text_decoder(tmp_path: Path, reference: Reference) -> None:
    config = Qwen3_5MoeConfig(
        text_config=QWEN3_5_MOE_TEXT,
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=48),
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    path = save_tiny(Qwen3_5MoeForConditionalGeneration(config), tmp_path)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    core = _served_as_transformers_serves_it(path, reference)
    layers = core.kv.layout.layers
    assert [kv is None for kv in layers] == [True, True, True, False], "KV only in the full-attention layer"
    assert core.kv.state is not None and core.kv.used_blocks == 0


def test_a_released_gemma4_checkpoint_serves_its_text_decoder(tmp_path: Path, reference: Reference) -> None:
    config = Gemma4Config(text_config=GEMMA4_TEXT, vision_config=None, audio_config=None, tie_word_embeddings=True)
    torch.manual_seed(1234)
    path = save_tiny(Gemma4ForConditionalGeneration(config), tmp_path)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Gemma4ForConditionalGeneration"]
    core = _served_as_transformers_serves_it(path, reference)
    assert len(set(core.kv.layout.layers)) > 1, "the full-attention layer keeps KV of its own shape"
