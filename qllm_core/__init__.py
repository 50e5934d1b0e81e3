"""qllm_core: a single-device MoE inference engine with layer- and expert-level preemption. Imports no Ray."""

from qllm_core.config import EngineConfig, Granularity
from qllm_core.engine import Engine
from qllm_core.engine_core import EngineCore, EngineStats
from qllm_core.errors import (
    ConfigError,
    DuplicateRequestError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
    QllmError,
    RequestFailedError,
)
from qllm_core.request import FinishReason, PriorityClass, RequestOutput, SamplingParams

__all__ = [
    "ConfigError",
    "DuplicateRequestError",
    "Engine",
    "EngineConfig",
    "EngineCore",
    "EngineStats",
    "EngineStoppedError",
    "FinishReason",
    "Granularity",
    "InvalidRequestError",
    "PriorityClass",
    "PromptTooLongError",
    "QllmError",
    "RequestFailedError",
    "RequestOutput",
    "SamplingParams",
]
