"""Shared fixtures: tiny random checkpoints of every supported family, saved and loaded like real ones."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from qllm_core.engine_core import EngineCore
from qllm_core.models.builtin import build_tokenizer
from qllm_core.outputs import RequestOutput

DEVICE = os.environ.get("QLLM_TEST_DEVICE", "cpu")
"""Where the engine tests run: CPU by default (CI); `QLLM_TEST_DEVICE=cuda` runs them on a GPU."""
VOCAB = 384
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.15,
    tie_word_embeddings=False,
    eos_token_id=0,
    pad_token_id=0,
)


def _mixtral() -> PreTrainedModel:
    return MixtralForCausalLM(
        MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=6, num_experts_per_tok=2, sliding_window=None)
    )


def _qwen2_moe() -> PreTrainedModel:
    # Layer 1 is dense (mlp_only_layers); every MoE layer has a gated shared expert.
    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=6,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            qkv_bias=True,
        )
    )


def _olmoe() -> PreTrainedModel:
    return OlmoeForCausalLM(
        OlmoeConfig(**COMMON, intermediate_size=64, num_experts=6, num_experts_per_tok=2, clip_qkv=4.0)
    )


FAMILIES: dict[str, Callable[[], PreTrainedModel]] = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "olmoe": _olmoe}


def save_tiny(model: PreTrainedModel, path: Path, **save_kwargs: object) -> Path:
    """Save a tiny model as a user's checkpoint: token 0 as its EOS, the built-in tokenizer beside it."""
    model.generation_config.eos_token_id = 0
    model.save_pretrained(path, **save_kwargs)
    build_tokenizer(VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved random checkpoint (with a real tokenizer) per supported family."""
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(1234)
        paths[name] = save_tiny(make(), root / name)
    return paths


@pytest.fixture(scope="session")
def reference() -> Callable[..., list[int]]:
    """Greedy continuation by transformers' own `generate` (batch of one, EOS stops it); experts run by
    the eager loop unless `experts` names another transformers implementation (None: its default)."""
    models: dict[tuple[Path, torch.dtype, str | None], PreTrainedModel] = {}

    def generate(
        path: Path, dtype: torch.dtype, prompt_ids: list[int], max_new_tokens: int, experts: str | None = "eager"
    ) -> list[int]:
        key = (path, dtype, experts)
        if key not in models:
            kwargs = {} if experts is None else {"experts_implementation": experts}
            models[key] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(DEVICE).eval()
        ids = torch.tensor([prompt_ids], device=DEVICE)
        out = models[key].generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return [int(t) for t in out[0, len(prompt_ids) :]]

    return generate


def drain(core: EngineCore, max_steps: int = 100_000) -> dict[str, RequestOutput]:
    """Step an engine core until it is idle; returns each request's final output."""
    finals: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not core.has_work():
            return finals
        for out in core.step():
            if out.finished:
                finals[out.request_id] = out
    raise AssertionError(f"engine still busy after {max_steps} steps: {core.stats()}")
