"""Every MoE family of the installed transformers as a tiny random checkpoint, and the docs table of which
the engine serves (`docs/models.md`; regenerate with `python -m tests.qllm_core.models.tiny_families`).

A family is a model type with a causal-LM class whose config counts experts. Its tiny config comes from
its own config class: the shared small sizes below for every field the class has, plus a few per-family
values its validation demands.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from qllm_core import EngineConfig
from qllm_core.engine_core import EngineCore
from qllm_core.errors import ConfigError
from qllm_core.models.builtin import build_tokenizer
from qllm_core.models.families import REFUSED
from tests.conftest import VOCAB, save_tiny

MAX_PARAMETERS = 2_000_000
"""Most parameters a tiny checkpoint may have (the sweep builds dozens)."""
DOCS = Path(__file__).resolve().parents[3] / "docs" / "models.md"

# Sizes every family shares, applied to the fields its config class has.
SIZES: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    intermediate_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=40,
    shared_experts_intermediate_size=40,
    index_head_dim=8,
    index_n_heads=2,
    num_experts=6,
    num_local_experts=6,
    n_routed_experts=6,
    moe_num_experts=6,
    num_experts_per_tok=2,
    num_experts_per_token=2,
    moe_k=2,
    n_shared_experts=1,
    num_shared_experts=1,
    moe_num_shared_experts=1,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    num_expert_group=2,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=12,
    v_head_dim=10,
    max_position_embeddings=512,
    sliding_window=8,
    initializer_range=0.15,
    tie_word_embeddings=False,
    eos_token_id=0,
    pad_token_id=0,
    bos_token_id=None,
    # Recurrent layers (Gated DeltaNet, KDA, Mamba-2): small heads and states.
    linear_key_head_dim=12,
    linear_value_head_dim=12,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_head_dim=12,
    linear_num_heads=4,
    ssm_state_size=8,
    mamba_num_heads=4,
    mamba_head_dim=24,
    mamba_d_state=8,
    use_mamba_kernels=False,
)
_HYBRID = dict(layer_types=["linear_attention", "full_attention", "linear_attention"])
"""Gated DeltaNet, softmax attention, Gated DeltaNet: both kinds of layer in three."""
# What a family's own validation or shape demands beyond SIZES.
OVERRIDES: dict[str, dict[str, Any]] = {
    "zaya": dict(num_experts_per_tok=1),
    "dbrx": dict(
        d_model=48,
        n_heads=4,
        n_layers=3,
        max_seq_len=512,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=6, moe_top_k=2),
    ),
    "longcat_flash": dict(num_layers=2, ffn_hidden_size=64, expert_ffn_hidden_size=32, moe_topk=2, zero_expert_num=2),
    "inkling_text": dict(
        swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=12, sliding_window_size=8, rel_extent=16
    ),
    "doge": dict(is_moe=True, num_experts=16),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
    "qwen3_next": _HYBRID,
    "qwen3_5_moe_text": _HYBRID,
    "lara_mini": dict(layer_types=["linear_attention", "full_attention", "sliding_attention"]),
    "kimi_linear": _HYBRID,
    "minimax": _HYBRID,
    "bailing_hybrid": _HYBRID,
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=24, mamba_d_state=8, **_HYBRID),
    "qwen4_exp_text": _HYBRID,
    "nemotron_h": dict(
        n_groups=1, num_hidden_layers=4, layers_block_type=["linear_attention", "moe", "full_attention", "moe"]
    ),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0),
    # As Gemma 4's MoE checkpoint: no per-layer inputs; the logits soft-capped.
    "gemma4_text": dict(
        enable_moe_block=True, top_k_experts=2, hidden_size_per_layer_input=0, final_logit_softcapping=30.0
    ),
}


@dataclass(frozen=True)
class Status:
    """What the engine does with one family: serve it, or refuse it and why."""

    family: str
    supported: bool
    reason: str = ""


def config_fields(model_type: str) -> set[str]:
    """The fields of a model type's config class."""
    return {f.name for f in dataclasses.fields(CONFIG_MAPPING[model_type])}


def moe_families() -> list[str]:
    """Model types of the installed transformers with a causal-LM class whose config (or one of its
    sub-configs, as DBRX's `ffn_config`) has a field about experts. A multimodal wrapper is left out: its
    `text_config`'s own model type is a family of its own."""
    families = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if model_type not in CONFIG_MAPPING:
            continue
        config_class = CONFIG_MAPPING[model_type]
        if "text_config" in config_class.sub_configs:
            continue
        classes = [c for c in (config_class, *config_class.sub_configs.values()) if dataclasses.is_dataclass(c)]
        if any("expert" in f.name for c in classes for f in dataclasses.fields(c)):
            families.append(model_type)
    return families


def tiny_config(model_type: str) -> PretrainedConfig:
    """A tiny config of the model type from its own config class."""
    fields = config_fields(model_type)
    values = {k: v for k, v in SIZES.items() if k in fields}
    if "kv_lora_rank" in fields:  # multi-head latent attention expands K and V to every head
        values["num_key_value_heads"] = values["num_attention_heads"]
    values |= OVERRIDES.get(model_type, {})
    return CONFIG_MAPPING[model_type](**values)


def save_checkpoint(model_type: str, directory: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny random checkpoint with the built-in tokenizer; families refused before loading get only their
    config (the engine must refuse them from it)."""
    config = tiny_config(model_type)
    directory.mkdir(parents=True, exist_ok=True)
    if model_type in REFUSED:
        config.save_pretrained(directory)
    else:
        with torch.device("meta"):  # count first: a config field SIZES misses could make it huge
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            raise AssertionError(f"{model_type}: the tiny config has {size} parameters; shrink it in OVERRIDES")
        torch.manual_seed(1234)
        return save_tiny(AutoModelForCausalLM.from_config(config, dtype=dtype), directory)
    build_tokenizer(VOCAB).save_pretrained(directory)
    return directory


def status_of(model_type: str, error: ConfigError | None) -> Status:
    """The table row for a family the engine loaded (no error) or refused."""
    if error is None:
        return Status(model_type, True)
    reason = str(error).removeprefix(f"model type {model_type!r} is not supported: ")
    return Status(model_type, False, reason)


def render(statuses: list[Status]) -> str:
    """docs/models.md from the statuses of every family."""
    served = [s for s in statuses if s.supported]
    lines = [
        "# Supported model families",
        "",
        "Generated by `python -m tests.qllm_core.models.tiny_families` from the family sweep",
        f"(`tests/qllm_core/models/test_families.py`, transformers {transformers.__version__}): every model type",
        "with a causal-LM class whose config counts experts, built tiny from its own config class and loaded by",
        "the engine. *Served* families passed the load probe (which also prefills each prompt in two chunks) and",
        "give transformers' own greedy tokens in float64 under layer and expert preemption, with LS passes merged",
        "into suspended BE ones, BE prompts prefilled in chunks and a request aborted inside a suspended pass, and",
        "pick transformers' top-1 token in float32; *refused* ones fail at load with this `ConfigError`, which says",
        "what would serve them.",
        "",
        "The KV pool holds each layer's own KV shape (heads, key width, value width), or none for a layer that keeps",
        "none, under one block table. Layers with recurrent state (Gated DeltaNet, Kimi Delta Attention, Mamba-2,",
        "short convolutions, lightning attention) keep it in a state slot per request, zeroed when the request gets",
        "its blocks and freed with them, charged to the pool in blocks; the model's own mixers read and write it",
        "through transformers' `Cache` state methods (`qllm_core/state_pool.py`).",
        "",
        f"{len(served)} of {len(statuses)} families are served.",
        "",
        "| model type | status | why refused |",
        "|---|---|---|",
    ]
    for s in statuses:
        reason = s.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{s.family}` | {'served' if s.supported else 'refused'} | {reason} |")
    return "\n".join(lines) + "\n"


def load_error(path: Path, device: str = "cpu") -> ConfigError | None:
    """The ConfigError the engine raises loading a checkpoint in float64, or None when it loads."""
    try:
        EngineCore(EngineConfig(model=str(path), dtype="float64", device=device))
    except ConfigError as error:
        return error
    return None


def sweep_statuses(root: Path) -> Iterator[Status]:
    """Load every family's tiny checkpoint in the engine and report what it did."""
    for model_type in moe_families():
        yield status_of(model_type, load_error(save_checkpoint(model_type, root / model_type)))


if __name__ == "__main__":
    import tempfile

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        DOCS.write_text(render(list(sweep_statuses(Path(tmp)))))
    sys.stdout.write(f"wrote {DOCS}\n")
