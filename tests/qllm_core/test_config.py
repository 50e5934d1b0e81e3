"""EngineConfig validates itself at construction and rejects unknown keys."""

from __future__ import annotations

import dataclasses

import pytest

from qllm_core import ConfigError, Engine, EngineConfig
from qllm_core.config import Granularity


def test_defaults_are_valid_and_frozen() -> None:
    config = EngineConfig()
    assert config.model == "tiny" and config.policy == "qllm" and config.granularity is Granularity.LAYER
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.policy = "fcfs"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("policy", "lifo", "policy='lifo' is unknown"),
        ("granularity", "token", "granularity='token'"),
        ("dtype", "int8", "dtype='int8'"),
        ("device", "tpu", "device='tpu'"),
        ("max_batch_size", 0, "max_batch_size=0"),
        ("kv_cache_tokens", 8, "smaller than one block"),
        ("be_max_wait_s", -1.0, "be_max_wait_s"),
        ("be_max_wait_s", float("inf"), "be_max_wait_s"),
        ("default_priority", "urgent", "default_priority"),
        ("merge_ls_into_be", "yes", "merge_ls_into_be"),
        ("max_model_len", 0, "max_model_len"),
    ],
)
def test_bad_values_are_rejected_with_a_message(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        EngineConfig.from_dict({field: value})


def test_unknown_keys_are_rejected_and_known_ones_listed() -> None:
    with pytest.raises(ConfigError, match=r"unknown engine setting\(s\) \['polcy'\].*'policy'"):
        EngineConfig.from_dict({"polcy": "fcfs"})


def test_missing_model_directory_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="neither a built-in model"):
        Engine(EngineConfig(model="/nonexistent/checkpoint", device="cpu"))


def test_cuda_without_cuda_is_a_config_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Engine(EngineConfig(device="cuda"))
