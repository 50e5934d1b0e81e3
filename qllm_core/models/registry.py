"""Model loading: a built-in preset or a local checkpoint, through `from_pretrained`, with its family adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from qllm_core.config import BUILTIN_MODELS, EngineConfig
from qllm_core.errors import ConfigError
from qllm_core.models.adapter import MoEAdapter
from qllm_core.models.attention import ATTENTION_NAME
from qllm_core.models.builtin import ensure_builtin
from qllm_core.models.mixtral import MixtralAdapter
from qllm_core.models.olmoe import OlmoeAdapter
from qllm_core.models.qwen2_moe import Qwen2MoeAdapter
from qllm_core.models.staged import StagedModel

ADAPTERS: dict[str, type[MoEAdapter]] = {
    t: a for a in (MixtralAdapter, Qwen2MoeAdapter, OlmoeAdapter) for t in a.model_types
}


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)  # type: ignore[no-any-return]


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


def load_model(config: EngineConfig) -> LoadedModel:
    """Load weights with `from_pretrained` (accelerate places them via `device_map`) and wrap the family adapter."""
    path = model_path(config.model)
    hf_config = AutoConfig.from_pretrained(path)
    adapter_cls = ADAPTERS.get(hf_config.model_type)
    if adapter_cls is None:
        raise ConfigError(
            f"model type {hf_config.model_type!r} is not supported; supported families: {sorted(ADAPTERS)}"
        )
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map={"": device},
        attn_implementation=ATTENTION_NAME,
        experts_implementation=experts_implementation(dtype),
    )
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    context = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
    max_len = config.max_model_len or context
    if context and max_len > context:
        raise ConfigError(f"max_model_len={max_len} exceeds the model's max_position_embeddings={context}")
    if not max_len:
        raise ConfigError("the model does not state its context length; set max_model_len")
    return LoadedModel(
        staged=StagedModel(adapter_cls(model), grouped=experts_implementation(dtype) is None),
        tokenizer=tokenizer,
        path=path,
        dtype=dtype,
        device=device,
        max_model_len=max_len,
        eos_token_ids=frozenset(int(e) for e in eos_ids),
        vocab_size=int(hf_config.vocab_size),
    )
