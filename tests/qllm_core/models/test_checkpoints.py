"""Real checkpoint habits: sharded safetensors with an index, several EOS ids, the tokenizer's own chat
template, the dtype a checkpoint states, and remote code refused. Each checkpoint is built here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qllm_core import ConfigError, EngineConfig, FinishReason, SamplingParams
from qllm_core.engine_core import EngineCore
from qllm_core.models.registry import resolve_dtype
from tests.conftest import DEVICE, FAMILIES, drain, save_tiny

PROMPT = [5, 17, 99, 250, 3, 3, 42]
Reference = Callable[..., list[int]]


def _save(path: Path, **save_kwargs: object) -> Path:
    torch.manual_seed(1234)
    return save_tiny(FAMILIES["mixtral"](), path, **save_kwargs)


def _greedy(core: EngineCore, max_tokens: int = 12, ignore_eos: bool = False) -> tuple[list[int], FinishReason]:
    core.add_request("r", PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos), "ls")
    out = drain(core)["r"]
    assert out.finish_reason is not None
    return list(out.token_ids), out.finish_reason


def test_a_sharded_safetensors_checkpoint_with_an_index_gives_transformers_tokens(
    tmp_path: Path, reference: Reference
) -> None:
    path = _save(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    core = EngineCore(EngineConfig(model=str(path), dtype="float64", device=DEVICE, granularity="expert"))
    tokens, _ = _greedy(core)
    assert tokens == reference(path, torch.float64, PROMPT, 12)


def test_any_of_several_eos_ids_in_the_generation_config_ends_a_request(tmp_path: Path) -> None:
    path = _save(tmp_path)
    free, _ = _greedy(EngineCore(EngineConfig(model=str(path), dtype="float64", device=DEVICE)), ignore_eos=True)
    stop_at = free[3]  # a token the model emits: made an EOS id, second in the list
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [0, stop_at]
    (path / "generation_config.json").write_text(json.dumps(config))
    core = EngineCore(EngineConfig(model=str(path), dtype="float64", device=DEVICE))
    assert {0, stop_at} <= core.loaded.eos_token_ids
    tokens, reason = _greedy(core)
    assert reason is FinishReason.STOP and tokens == free[: free.index(stop_at) + 1]


def test_the_tokenizers_own_chat_template_is_what_chat_requests_get(tmp_path: Path) -> None:
    path = _save(tmp_path)
    # Where transformers saves a tokenizer's template today (older checkpoints keep it in tokenizer_config).
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>>"
    (path / "chat_template.jinja").write_text(template)
    core = EngineCore(EngineConfig(model=str(path), dtype="float64", device=DEVICE))
    messages = [{"role": "user", "content": "hello"}]
    ids = core.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert core.loaded.tokenizer.decode(ids) == "[user] hello\n>>"


def test_a_checkpoint_that_ships_its_own_modeling_code_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = _save(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        EngineCore(EngineConfig(model=str(path), device=DEVICE))


@pytest.mark.parametrize(
    ("stated", "device", "expected"),
    [
        (torch.bfloat16, "cuda", torch.bfloat16),
        (torch.float16, "cuda", torch.float16),
        (torch.float32, "cuda", torch.float32),
        (None, "cuda", torch.bfloat16),
        (torch.float64, "cuda", torch.bfloat16),
        (torch.bfloat16, "cpu", torch.float32),
    ],
)
def test_auto_dtype_is_the_checkpoints_own_on_cuda_and_float32_on_cpu(
    stated: torch.dtype | None, device: str, expected: torch.dtype
) -> None:
    assert resolve_dtype("auto", torch.device(device), stated) == expected
    assert resolve_dtype("float64", torch.device(device), stated) == torch.float64, "an explicit dtype wins"


def test_the_checkpoints_stated_dtype_reaches_the_loader(tmp_path: Path) -> None:
    path = _save(tmp_path)
    config = json.loads((path / "config.json").read_text())
    stated = config.get("dtype") or config.get("torch_dtype")
    assert stated == "float32", "save_pretrained records the dtype the weights were saved in"
    core = EngineCore(EngineConfig(model=str(path), device=DEVICE))
    assert core.loaded.dtype == torch.float32  # float32 on a CPU whatever is stated; the stated float32 on CUDA
