"""Model loading: a built-in preset or a local checkpoint, through `from_pretrained`, with its family
adapter, checked at load against the model's own forward (`probe.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from qllm_core.cache import KVLayout
from qllm_core.config import BUILTIN_MODELS, EngineConfig
from qllm_core.errors import ConfigError
from qllm_core.models.adapter import MoEAdapter
from qllm_core.models.attention import ATTENTION_NAME, set_window
from qllm_core.models.builtin import ensure_builtin
from qllm_core.models.families import ADAPTERS, REFUSED
from qllm_core.models.probe import attention_calls, check_staged, kv_layout, layer_windows, state_layout
from qllm_core.models.staged import StagedModel

# What dtype "auto" may take from a checkpoint on CUDA; anything else (float64, none stated) gives bfloat16.
_CUDA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine, with the facts found while loading it."""

    staged: StagedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    eos_token_ids: frozenset[int]
    vocab_size: int


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device='cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, checkpoint: torch.dtype | None = None) -> torch.dtype:
    """'auto' on CUDA is the checkpoint's own dtype (its config's `dtype`, or `torch_dtype` in older
    checkpoints) when that is bfloat16, float16 or float32, else bfloat16; on CPU it is float32, whatever
    the checkpoint says (half-precision matrix products are slow on CPUs)."""
    if name != "auto":
        return getattr(torch, name)  # type: ignore[no-any-return]
    if device.type != "cuda":
        return torch.float32
    return checkpoint if checkpoint in _CUDA_DTYPES else torch.bfloat16


def experts_implementation(dtype: torch.dtype) -> str | None:
    """How a layer's experts run when they run together: transformers' default fused kernel (grouped_mm),
    except where it has none (float64), where its eager loop runs them. At expert granularity the engine
    runs spans of experts itself, through `grouped_mm` or, in float64, with the eager loop's arithmetic."""
    return "eager" if dtype == torch.float64 else None


def model_path(name: str) -> Path:
    """A built-in preset's directory (built on first use) or a local checkpoint directory."""
    if name in BUILTIN_MODELS:
        return ensure_builtin(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model={name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a local directory "
            "with a config.json; models are never downloaded at run time"
        )
    return path


def checkpoint_config(path: Path) -> PretrainedConfig:
    """The checkpoint's transformers config; refuses remote code and families refused before loading."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path / 'config.json'} is not a readable JSON config: {exc}") from None
    family = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(family, str):
        raise ConfigError(f"{path / 'config.json'} names no model_type; it is not a transformers checkpoint")
    if "auto_map" in raw:
        raise ConfigError(
            f"model type {family!r}: the checkpoint ships its own modeling code (auto_map in config.json), "
            "which qllm never runs (no trust_remote_code); if transformers has this family built in, remove "
            "auto_map from config.json to load transformers' own implementation"
        )
    if family in REFUSED:
        raise ConfigError(f"model type {family!r} is not supported: {REFUSED[family]}")
    try:
        return AutoConfig.from_pretrained(path)
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            f"model type {family!r} is not supported: the installed transformers does not know it ({exc})"
        ) from None


def load_model(config: EngineConfig) -> LoadedModel:
    """Load weights with `from_pretrained` (accelerate places them via `device_map`), map the family onto
    the stages and check the staged forward against the model's own; ConfigError names what is wrong."""
    path = model_path(config.model)
    hf_config = checkpoint_config(path)
    family = str(hf_config.model_type)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, getattr(hf_config, "dtype", None))
    text_config = hf_config.get_text_config()
    context = int(getattr(text_config, "max_position_embeddings", 0) or 0)
    max_len = config.max_model_len or context
    if context and max_len > context:
        raise ConfigError(f"max_model_len={max_len} exceeds the model's max_position_embeddings={context}")
    if not max_len:
        raise ConfigError("the model does not state its context length; set max_model_len")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            device_map={"": device},
            attn_implementation=ATTENTION_NAME,
            experts_implementation=experts_implementation(dtype),
        )
    except ValueError as exc:  # transformers' words for a config it has no causal-LM class for, and the like
        raise ConfigError(f"model type {family!r} is not supported: it does not load as a causal LM ({exc})") from None
    model.eval()
    model.requires_grad_(False)
    staged = stage_model(model, family, grouped=experts_implementation(dtype) is None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    return LoadedModel(
        staged=staged,
        tokenizer=tokenizer,
        path=path,
        dtype=dtype,
        device=device,
        max_model_len=max_len,
        eos_token_ids=frozenset(int(e) for e in eos_ids),
        vocab_size=int(text_config.vocab_size),
    )


def stage_model(model: torch.nn.Module, family: str, grouped: bool) -> StagedModel:
    """The model cut into stages by its family's adapter (the default one for most families), its KV
    layout read from its own attention calls, and the result checked against its own forward."""
    adapter = ADAPTERS.get(family, MoEAdapter)(model)
    num_layers = len(adapter.layers)
    calls = attention_calls(model, family)
    state = state_layout(model, family, num_layers)
    staged = StagedModel(adapter, grouped=grouped, layout=KVLayout(()), state=state)
    attention = [i for i, p in enumerate(staged.parts) if p.attn is not None and not p.recurrent]
    staged.layout = kv_layout(family, calls, attention, num_layers, state)
    for parts, window in zip(staged.parts, layer_windows(model, calls, num_layers), strict=True):
        if parts.attn is not None and not parts.recurrent:
            set_window(parts.attn, window)
    if all(p.moe is None for p in staged.parts):
        raise ConfigError(
            f"model type {family!r} is not supported: it has no MoE layer; qllm serves Mixture-of-Experts models"
        )
    check_staged(staged, model, family)
    return staged
