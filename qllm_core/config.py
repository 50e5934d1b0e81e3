"""Engine settings: one frozen dataclass, validated at construction, the one home of every default.

YAML (serve_config.yaml) and the command line map onto `EngineConfig` through `EngineConfig.from_dict`,
which rejects unknown keys. Facts discovered at run time (the model's context length, the KV pool's
size in blocks) live on the objects that discover them, never on the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qllm_core.errors import ConfigError
from qllm_core.request import PriorityClass
from qllm_core.scheduler import POLICIES
from qllm_core.scheduler.base import Granularity, SchedulerConfig

__all__ = ["BUILTIN_MODELS", "DTYPES", "EngineConfig", "Granularity", "SchedulerConfig"]


DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")
COST_MODEL_SOURCES = ("calibrate", "file", "off")
BUILTIN_MODELS = ("tiny", "bench")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine: model, numerics, device, batching, KV memory and scheduling."""

    model: str = "tiny"
    """"tiny" (built-in default), "bench" (the benchmark preset) or a local checkpoint directory."""
    dtype: str = "auto"
    """"auto" is bfloat16 on CUDA and float32 on CPU."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:N" or "auto" (CUDA when present)."""
    policy: str = "qllm"
    """Scheduling policy: "fcfs", "priority", "chunked" or "qllm"."""
    granularity: Granularity = Granularity.LAYER
    """Preemption points: "iteration", "layer" or "expert" (a string from YAML becomes the enum)."""
    expert_spans_per_layer: int = 8
    """At expert granularity, the most steps (and so preemption points) a layer's routed experts take: one
    expert per span when no more are hit, else spans of consecutive experts with about equal tokens."""
    max_batch_size: int = 32
    """Most sequences in one forward pass."""
    max_batched_tokens: int = 4096
    """Most new tokens in one forward pass (a single prompt longer than this still runs, alone)."""
    chunk_tokens: int = 512
    """Token budget of one pass under the `chunked` policy (prompts are split to fit it), and the size of the
    BE prompt chunks `qllm` adds to decode passes. 512 is the default vLLM chose for chunked prefill, the best
    balance of inter-token latency and TTFT in its A100 measurements: a smaller budget shortens the pass an
    arriving LS prompt waits behind, but splits more prompts and reads the weights once per chunk."""
    kv_cache_tokens: int = 65536
    """KV cache capacity in tokens, summed over all requests."""
    block_size: int = 16
    """Tokens per KV block."""
    max_model_len: int | None = None
    """Longest prompt plus output; None takes the model's max_position_embeddings."""
    be_max_wait_s: float = 5.0
    """Aging bound: BE work waiting longer than this goes into the next pass first, and a BE pass suspended
    this long resumes even with LS prompts waiting (it may be suspended again after)."""
    merge_ls_into_be: bool = False
    """Let an LS pass join a suspended BE pass at the layer where the BE pass stopped."""
    be_decodes_in_ls_passes: bool = False
    """Under `qllm`, let BE decodes ride in the pass that prefills LS prompts. Off: each one lengthens that
    pass (on a CPU about as much as a token of the prompt), which the LS prompts wait out, and the BE
    decodes lose little by taking the next pass. Measured on the CPU bench preset with ShareGPT lengths
    near saturation (benchmarks/results/issue13-qllm-no-be-fill-0.9x): off cut LS slowdown p50 from about
    1.8x to 1.3-1.6x and raised output tokens/s. On a GPU, where a decode row in a prefill pass costs
    little, turning it on may pay; that is not measured."""
    cost_model: str = "calibrate"
    """Where the pass cost model comes from: "calibrate" (time a few passes of this model on this device at
    start-up), "file" (read `cost_model_file`, as `python -m qllm_core.calibration` writes it) or "off" (plan
    with a nominal model, `CostFit.nominal`, that ranks passes by their token counts)."""
    cost_model_file: str | None = None
    """The cost model file read when `cost_model` is "file"."""
    ls_tpot_target_s: float | None = None
    """Under `qllm`, the most time a pass carrying LS decodes should take, BE work riding in it included. None:
    what a `chunked` pass of those decodes would cost (them plus a prompt chunk, `chunk_tokens` tokens in all),
    so that LS time per token is no worse than under `chunked`, at the BE share `chunked` gives."""
    ls_ttft_slack: float = 0.25
    """Under `qllm`, how much longer than its isolated time an LS prompt's pass may be made by a choice that
    serves other work (LS decodes riding in it, a running pass finished first), and the margin by which
    preempting an LS prefill for other LS prompts must lower the worse slowdown."""
    default_priority: str = "latency_sensitive"
    """Class of a request that names none."""
    ttft_window: int = 256
    """How many recent TTFTs per class `stats()` keeps."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be 'tiny', 'bench' or a local checkpoint directory")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r} is unknown; use one of {', '.join(sorted(POLICIES))}")
        if not isinstance(self.granularity, Granularity):
            try:
                object.__setattr__(self, "granularity", Granularity(self.granularity))
            except ValueError:
                names = ", ".join(repr(g.value) for g in Granularity)
                raise ConfigError(f"granularity={self.granularity!r} is unknown; use one of {names}") from None
        for name in (
            "expert_spans_per_layer",
            "max_batch_size",
            "max_batched_tokens",
            "chunk_tokens",
            "kv_cache_tokens",
            "block_size",
            "ttft_window",
        ):
            require_positive_int(name, getattr(self, name))
        if self.max_model_len is not None:
            require_positive_int("max_model_len", self.max_model_len)
        if self.kv_cache_tokens < self.block_size:
            raise ConfigError(
                f"kv_cache_tokens={self.kv_cache_tokens} is smaller than one block (block_size={self.block_size})"
            )
        self._check_scheduling()
        try:
            PriorityClass.parse(self.default_priority)
        except ValueError as exc:
            raise ConfigError(f"default_priority: {exc}") from None

    def _check_scheduling(self) -> None:
        """The scheduling settings: aging, flags, the cost model's source and qllm's targets."""
        require_positive_number("be_max_wait_s", self.be_max_wait_s)
        for name in ("merge_ls_into_be", "be_decodes_in_ls_passes"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false")
        if self.cost_model not in COST_MODEL_SOURCES:
            raise ConfigError(f"cost_model={self.cost_model!r} is unknown; use one of {', '.join(COST_MODEL_SOURCES)}")
        if self.cost_model == "file" and not self.cost_model_file:
            raise ConfigError(
                "cost_model: file needs cost_model_file (a path written by python -m qllm_core.calibration)"
            )
        if self.cost_model != "file" and self.cost_model_file is not None:
            raise ConfigError(
                f"cost_model_file is read only with cost_model: file (cost_model is {self.cost_model!r}); "
                "set cost_model: file or drop cost_model_file"
            )
        if self.ls_tpot_target_s is not None:
            require_positive_number("ls_tpot_target_s", self.ls_tpot_target_s)
        slack = self.ls_ttft_slack
        if isinstance(slack, bool) or not isinstance(slack, int | float) or not math.isfinite(slack) or slack < 0:
            raise ConfigError(f"ls_ttft_slack={slack!r} must be a finite number >= 0 (0.25: a quarter more)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EngineConfig:
        """Build from a mapping (YAML, JSON, CLI); unknown keys are an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown engine setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**values)

    def scheduler_config(self) -> SchedulerConfig:
        """The settings a scheduling policy needs."""
        return SchedulerConfig(
            policy=self.policy,
            granularity=self.granularity,
            max_batch_size=self.max_batch_size,
            max_batched_tokens=self.max_batched_tokens,
            be_max_wait_s=float(self.be_max_wait_s),
            merge_ls_into_be=self.merge_ls_into_be,
            be_decodes_in_ls_passes=self.be_decodes_in_ls_passes,
            chunk_tokens=self.chunk_tokens,
            ls_tpot_target_s=None if self.ls_tpot_target_s is None else float(self.ls_tpot_target_s),
            ls_ttft_slack=float(self.ls_ttft_slack),
        )


def require_positive_int(name: str, value: object) -> None:
    """Raise ConfigError unless `value` is an int > 0 (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def require_positive_number(name: str, value: object) -> None:
    """Raise ConfigError unless `value` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive, finite number")
