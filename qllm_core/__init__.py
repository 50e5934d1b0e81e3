"""qllm_core: a single-device MoE inference engine with layer- and expert-level preemption. Imports no Ray.

Exports are lazy (PEP 562): `from qllm_core import PriorityClass` loads no torch; only the names that need
the model stack (`Engine`, `EngineCore`) import it, on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qllm_core.config import EngineConfig
    from qllm_core.engine import Engine
    from qllm_core.engine_core import EngineCore
    from qllm_core.errors import (
        ConfigError,
        DuplicateRequestError,
        EngineStalledError,
        EngineStoppedError,
        InvalidRequestError,
        PromptTooLongError,
        QllmError,
        RequestFailedError,
    )
    from qllm_core.outputs import RequestOutput
    from qllm_core.params import SamplingParams
    from qllm_core.request import FinishReason, PriorityClass
    from qllm_core.scheduler.base import Granularity
    from qllm_core.stats import EngineStats

_HOMES = {
    "ConfigError": "errors",
    "DuplicateRequestError": "errors",
    "Engine": "engine",
    "EngineConfig": "config",
    "EngineCore": "engine_core",
    "EngineStats": "stats",
    "EngineStalledError": "errors",
    "EngineStoppedError": "errors",
    "FinishReason": "request",
    "Granularity": "scheduler.base",
    "InvalidRequestError": "errors",
    "PriorityClass": "request",
    "PromptTooLongError": "errors",
    "QllmError": "errors",
    "RequestFailedError": "errors",
    "RequestOutput": "outputs",
    "SamplingParams": "params",
}

__all__ = [
    "ConfigError",
    "DuplicateRequestError",
    "Engine",
    "EngineConfig",
    "EngineCore",
    "EngineStalledError",
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'qllm_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qllm_core.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
