"""`EngineRunner`: a `qllm_core.Engine` in this process, its step loop on its own thread beside the client.

Each request is greedy with EOS ignored, so it produces exactly its `max_tokens`, as the paper's clients
ask for a fixed number of tokens. The output carrying the first token brings the engine's `Timeline` of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from benchmarks.metrics import EngineCounts
from benchmarks.runners import BenchmarkError, Runner, StreamEvent
from benchmarks.workload import RequestSpec

if TYPE_CHECKING:  # qllm_core's engine (and torch) load only when an in-process run needs them
    from qllm_core import Engine, EngineConfig, RequestOutput
    from qllm_core.models.registry import LoadedModel


def policy_label(config: EngineConfig) -> str:
    """How reports name an engine's policy: "qllm:layer"."""
    return f"{config.policy}:{config.granularity.value}"


def stream_engine(engine: Engine, spec: RequestSpec) -> AsyncIterator[RequestOutput]:
    """Submit one request to an engine (greedy, EOS ignored: exactly `max_tokens` tokens)."""
    from qllm_core import SamplingParams

    params = SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)
    if spec.prompt_token_ids is not None:
        return engine.generate(prompt_token_ids=list(spec.prompt_token_ids), params=params, priority=spec.priority)
    return engine.generate(prompt=spec.prompt_text, params=params, priority=spec.priority)


def stream_event(out: RequestOutput) -> StreamEvent:
    """What a runner reports of one engine output."""
    return StreamEvent(out.num_output_tokens, out.prompt_token_count, out.timeline)


class EngineRunner(Runner):
    """Runs a `qllm_core.Engine` in this process; the engine is built on `start` and shut down on `close`."""

    def __init__(self, config: EngineConfig, label: str | None = None, loaded: LoadedModel | None = None) -> None:
        """`loaded`: a model already loaded for this config's model, dtype and device (shared, not reloaded)."""
        self.config = config
        self.label = label if label is not None else policy_label(config)
        self._loaded = loaded
        self._engine: Engine | None = None

    async def start(self) -> None:
        from qllm_core import Engine as _Engine

        if self._engine is None:
            self._engine = _Engine(self.config, loaded=self._loaded)

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def _started(self) -> Engine:
        if self._engine is None:
            raise BenchmarkError("the runner is not started; use `async with runner:`")
        return self._engine

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        """Stream one request through the engine."""
        async for out in stream_engine(self._started(), spec):
            yield stream_event(out)

    async def engine_counts(self) -> EngineCounts:
        """The engine's totals of passes, preemptions and merges now."""
        return EngineCounts.of(self._started().stats())
