"""The versus-vLLM run's HTTP client: streaming `/v1/completions` over httpx, every token timestamped.

`StreamingRunner` is a `benchmarks.runners.Runner` (so `Runner.run` drives open-loop workloads through it),
whose `call` also returns a request's every token time and the response's `id` (qllm's id names the request
in its Serve access log, where the engine's TTFT is). It differs from `HttpRunner` in how the class travels:
vLLM takes an integer `priority` (lower is more urgent), qllm a class name (`PriorityWire`).

`PromptSource` makes prompts of random token ids that no two calls share: the first two ids of each
number the call, so no two prompts have a common prefix block a server could cache.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.runners import BenchmarkError, EndpointError, HttpSettings, Runner, StreamEvent, sse_chunks
from benchmarks.workload import Priority, RequestSpec
from qllm_core.request import PriorityClass

VLLM_PRIORITY: dict[Priority, int] = {"ls": 0, "be": 1}
"""vLLM's `--scheduling-policy priority` serves lower values first."""


class PriorityWire(enum.Enum):
    """How a request's class is written in the body's `priority` field."""

    QLLM = "qllm"
    """"latency_sensitive" / "best_effort" (`PriorityClass.label`)."""
    VLLM = "vllm"
    """0 for LS, 1 for BE (`VLLM_PRIORITY`)."""

    def encode(self, priority: Priority) -> int | str:
        """The field's value for a class."""
        return VLLM_PRIORITY[priority] if self is PriorityWire.VLLM else PriorityClass.parse(priority).label


@dataclass(frozen=True)
class CallTimes:
    """One streamed call as the client saw it (seconds on the client's monotonic clock)."""

    sent_s: float
    token_s: tuple[float, ...]
    """When each output token arrived (a chunk carrying k tokens gives k equal times)."""
    response_id: str | None
    prompt_tokens: int

    @property
    def ttft_s(self) -> float:
        """First token received minus sent."""
        if not self.token_s:
            raise BenchmarkError("a call without output tokens has no TTFT")
        return self.token_s[0] - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """Mean gap between output tokens; None with fewer than two."""
        n = len(self.token_s)
        return None if n < 2 else (self.token_s[-1] - self.token_s[0]) / (n - 1)


class PromptSource:
    """Prompts of random token ids in [low, high), the call's number in the first two ids (see the module
    docstring), seeded so that a run repeats."""

    def __init__(self, token_range: tuple[int, int] = (3, 500), seed: int = 0) -> None:
        low, high = token_range
        if not 0 <= low < high:
            raise BenchmarkError(f"token range [{low}, {high}) is empty; need 0 <= low < high")
        self._low, self._span = low, high - low
        self._rng = random.Random(seed)
        self._calls = 0

    def prompt(self, length: int) -> tuple[int, ...]:
        """A prompt of `length` ids (at least 2) that no earlier call of this source got."""
        if length < 2:
            raise BenchmarkError(f"prompts here are at least 2 tokens long, asked for {length}")
        if self._calls >= self._span * self._span:
            raise BenchmarkError("this prompt source has numbered every call it can; use a wider token range")
        hi, lo = divmod(self._calls, self._span)
        self._calls += 1
        rest = (self._low + self._rng.randrange(self._span) for _ in range(length - 2))
        return (self._low + hi, self._low + lo, *rest)

    def spec(self, length: int, max_tokens: int, priority: Priority = "ls", index: int = 0) -> RequestSpec:
        """A request sent at once with a fresh prompt."""
        return RequestSpec(index, 0.0, priority, max_tokens, prompt_token_ids=self.prompt(length))


class StreamingRunner(Runner):
    """Streams completions with greedy decoding, EOS ignored (each call yields exactly its max_tokens),
    and usage in every chunk, so that token counts are the server's own."""

    def __init__(self, settings: HttpSettings, wire: PriorityWire) -> None:
        self.settings = settings
        self.label = settings.label
        self.wire = wire
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._client is None:
            timeout = httpx.Timeout(self.settings.read_timeout_s, connect=self.settings.connect_timeout_s)
            # No connection cap: a client-side pool limit would queue requests and close the open loop.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits)

    async def __aenter__(self) -> StreamingRunner:
        await self.start()
        return self

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        """The request body of one spec."""
        return {
            "model": self.settings.model,
            "prompt": spec.prompt,
            "max_tokens": spec.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            **self.settings.extra_body,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "priority": self.wire.encode(spec.priority),
        }

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        async for event, _ in self._events(spec):
            yield event

    async def call(self, spec: RequestSpec) -> CallTimes:
        """Send one request and time every token it streams back."""
        sent = time.monotonic()
        times: list[float] = []
        response_id: str | None = None
        prompt_tokens = spec.prompt_len or 0
        async for event, chunk_id in self._events(spec):
            now = time.monotonic()
            times.extend([now] * (event.output_tokens - len(times)))
            response_id = response_id or chunk_id
            prompt_tokens = event.prompt_tokens or prompt_tokens
        if len(times) != spec.max_tokens:
            raise EndpointError(f"{self.label}: asked for {spec.max_tokens} tokens, got {len(times)}")
        return CallTimes(sent, tuple(times), response_id, prompt_tokens)

    async def _events(self, spec: RequestSpec) -> AsyncIterator[tuple[StreamEvent, str | None]]:
        if self._client is None:
            raise BenchmarkError("the runner is not started; use `async with runner:`")
        async with self._client.stream("POST", self.settings.url, json=self.body(spec)) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", errors="replace")
                raise EndpointError(f"HTTP {resp.status_code} from {self.settings.url}: {text[:300]}")
            count = 0
            async for chunk in sse_chunks(resp):
                usage = chunk.get("usage") or {}
                completion = usage.get("completion_tokens")
                # A chunk's usage counts the tokens so far; without usage, each chunk with a choice is one.
                count = max(count, completion) if isinstance(completion, int) else count + bool(chunk.get("choices"))
                prompt = usage.get("prompt_tokens")
                chunk_id = chunk.get("id")
                yield (
                    StreamEvent(count, prompt if isinstance(prompt, int) else None),
                    chunk_id if isinstance(chunk_id, str) else None,
                )
