"""Runners: send a workload open-loop and record what the client sees of each request.

Open loop: each request is sent at its scheduled arrival time whether or not earlier ones have finished,
so a slow server faces a growing queue rather than a politely waiting client. The runners share the
driver in `Runner.run` and differ only in how one request is streamed:

- `benchmarks.engine_runner.EngineRunner`: a `qllm_core.Engine` in this process (any policy and granularity).
- `benchmarks.child_runner.ChildRunner`: the same engine in a child process, its outputs streamed back
  over a pipe, so the engine's thread does not share the client's interpreter (and GIL).
- `HttpRunner`: any OpenAI-compatible `/v1/completions` endpoint, streaming server-sent events.

Prompts are sent as token ids when the workload has them (text otherwise); decoding is greedy. The
in-process runner ignores EOS so each request produces exactly its `max_tokens`, as the paper's clients
ask for a fixed number of tokens; an HTTP server does that only if told so (see `HttpSettings.extra_body`).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from benchmarks.checks import positive
from benchmarks.metrics import EngineCounts, RequestRecord
from benchmarks.workload import RequestSpec, Workload
from deployments.protocol import PRIORITY_HEADER
from qllm_core.request import PriorityClass
from qllm_core.timeline import Timeline


class BenchmarkError(RuntimeError):
    """A runner cannot do its job (the server is unreachable, warm-up requests fail)."""


class HttpSettingsError(ValueError):
    """An HTTP runner setting is invalid; the message says what to change."""


class EndpointError(RuntimeError):
    """One HTTP request failed: a non-200 status, an error event or a stream cut short."""


@dataclass(frozen=True)
class StreamEvent:
    """One streamed update of a request: its cumulative output token count (and prompt size when known)."""

    output_tokens: int
    prompt_tokens: int | None = None
    timeline: Timeline | None = None
    """On the update carrying the first token, from an engine that records one."""


@dataclass
class _Tracker:
    """A request's timestamps as they arrive (mutable while it runs; frozen into a `RequestRecord`)."""

    spec: RequestSpec
    sent_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    finished_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    timeline: Timeline | None = None

    def record(self) -> RequestRecord:
        spec = self.spec
        return RequestRecord(
            index=spec.index,
            priority=spec.priority,
            scheduled_s=spec.arrival_s,
            sent_s=self.sent_s if self.sent_s is not None else spec.arrival_s,
            first_token_s=self.token_times_s[0] if self.token_times_s else None,
            finished_s=self.finished_s if self.error is None else None,
            output_tokens=self.output_tokens,
            prompt_tokens=self.prompt_tokens if self.prompt_tokens is not None else spec.prompt_len,
            error=self.error,
            timeline=self.timeline,
            token_times_s=tuple(self.token_times_s),
        )

    def seen(self, event: StreamEvent, now: float) -> None:
        """Take in one streamed update that arrived at `now`: each new token is stamped with it (a chunk
        carrying several stamps them all alike)."""
        if event.output_tokens > self.output_tokens:
            self.token_times_s += [now] * (event.output_tokens - self.output_tokens)
            self.output_tokens = event.output_tokens
        if event.prompt_tokens is not None:
            self.prompt_tokens = event.prompt_tokens
        if event.timeline is not None:
            self.timeline = event.timeline


class Runner(ABC):
    """Sends workloads to one serving target. Use as `async with runner:`."""

    label: str
    """Names the target in reports (e.g. "qllm:layer")."""

    @abstractmethod
    async def start(self) -> None:
        """Acquire what the runner needs (an engine, an HTTP session); a second call does nothing."""

    @abstractmethod
    async def close(self) -> None:
        """Release it; safe to call twice."""

    @abstractmethod
    def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        """Send one request and yield an event per streamed update; raise when the request fails."""

    async def engine_counts(self) -> EngineCounts | None:
        """The engine's running totals of passes, preemptions and merges, read now; None when the target
        does not show them (an HTTP endpoint). A run's own counts are the difference around it."""
        return None

    async def __aenter__(self) -> Runner:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def run(
        self, workload: Workload, drain_timeout_s: float = 120.0, on_done: Callable[[], None] | None = None
    ) -> list[RequestRecord]:
        """Send every request at its arrival time; wait at most `drain_timeout_s` after the last send.

        Requests still running then are cancelled (the server sees the client go away) and recorded as
        failed, so a run is bounded in time however overloaded the target is.
        """
        origin = time.monotonic()
        trackers = [_Tracker(spec) for spec in workload.requests]
        tasks: list[asyncio.Task[None]] = []
        for tracker in trackers:
            delay = origin + tracker.spec.arrival_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._send(tracker, origin, on_done)))
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return [t.record() for t in trackers]

    async def _send(self, tracker: _Tracker, origin: float, on_done: Callable[[], None] | None) -> None:
        tracker.sent_s = time.monotonic() - origin
        try:
            async for event in self.stream(tracker.spec):
                tracker.seen(event, time.monotonic() - origin)
            if not tracker.token_times_s:
                tracker.error = "the stream ended without any output token"
            else:
                tracker.finished_s = tracker.token_times_s[-1]
        except asyncio.CancelledError:
            tracker.error = "not finished within the drain timeout"
            raise
        except Exception as exc:  # any failure of one request is data, not a reason to stop the run
            tracker.error = f"{type(exc).__name__}: {exc}"
        finally:
            if on_done is not None:
                on_done()

    async def warmup(
        self, requests: int = 2, prompt_len: int = 16, max_tokens: int = 4, token_range: tuple[int, int] = (3, 500)
    ) -> None:
        """Send a few small requests so first-call costs stay out of the measurements; fail loudly if they fail."""
        if requests <= 0:
            return
        await self._probe(probe_specs(requests, prompt_len, max_tokens, token_range), "warm-up")

    async def _probe(self, specs: tuple[RequestSpec, ...], what: str) -> list[RequestRecord]:
        """Run probe requests (all sent at once); BenchmarkError, naming `what`, when any of them fails."""
        records = await self.run(Workload(specs, 1.0, what), drain_timeout_s=300.0)
        failed = [r.error for r in records if not r.completed]
        if failed:
            raise BenchmarkError(f"{self.label}: {len(failed)} of {len(specs)} {what} requests failed: {failed[0]}")
        return records

    async def measure_decode_iteration(
        self, batch: int = 8, prompt_len: int = 64, max_tokens: int = 16, token_range: tuple[int, int] = (3, 500)
    ) -> float:
        """Time of one decode iteration: the median gap between consecutive tokens of `batch` requests
        sent together (after their prefills they decode as one batch, one token each per iteration)."""
        if batch < 1 or max_tokens < 2:
            raise BenchmarkError("decode calibration needs batch >= 1 and max_tokens >= 2")
        records = await self._probe(probe_specs(batch, prompt_len, max_tokens, token_range), "decode calibration")
        gaps = [gap for r in records for gap in r.inter_token_gaps_s]
        if not gaps:
            raise BenchmarkError(f"{self.label}: decode calibration saw no second token; is EOS ignored?")
        return statistics.median(gaps)


def probe_specs(
    n: int, prompt_len: int, max_tokens: int, token_range: tuple[int, int], seed: int = 1234
) -> tuple[RequestSpec, ...]:
    """`n` BE requests arriving at 0 with random prompts of `prompt_len` tokens, the same in every run."""
    rng = random.Random(seed)  # fixed: calibration must not depend on the workload's seed
    return tuple(
        RequestSpec(i, 0.0, "be", max_tokens, tuple(rng.randrange(*token_range) for _ in range(prompt_len)))
        for i in range(n)
    )


@dataclass(frozen=True)
class HttpSettings:
    """Where and how to reach an OpenAI-compatible completions endpoint."""

    endpoint: str
    """Base URL ("http://host:8000"), or one ending in "/v1" or "/v1/completions"."""
    model: str
    """The `model` field of each request."""
    label: str = "endpoint"
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    """Merged into every request body, e.g. {"ignore_eos": true} for servers that take it."""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    """Longest silence between two chunks of one stream before that request fails."""

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or not self.endpoint.startswith(("http://", "https://")):
            raise HttpSettingsError(f"endpoint must be an http:// or https:// URL, got {self.endpoint!r}")
        if not isinstance(self.model, str) or not self.model:
            raise HttpSettingsError("model must be a non-empty string (the server's model name)")
        reserved = {"model", "prompt", "max_tokens", "stream", "priority"} & set(self.extra_body)
        if reserved:
            raise HttpSettingsError(f"extra_body may not set {sorted(reserved)}: the runner sets them per request")
        for name in ("connect_timeout_s", "read_timeout_s"):
            positive(name, getattr(self, name), HttpSettingsError, unit="seconds")

    @property
    def url(self) -> str:
        """The full completions URL."""
        base = self.endpoint.rstrip("/")
        if base.endswith("/v1/completions"):
            return base
        if base.endswith("/v1"):
            return base + "/completions"
        return base + "/v1/completions"


class HttpRunner(Runner):
    """Streams `POST /v1/completions` requests; the class goes in the body's `priority` field and the
    `x-qllm-priority` header ("latency_sensitive" or "best_effort").

    Each server-sent `data:` chunk carrying a choice counts as one output token (qllm, vLLM and TGI stream
    one token per chunk); a chunk's `usage.completion_tokens`, when present, overrides the count.
    """

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self.label = settings.label
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._client is None:
            s = self.settings
            # No client-side connection cap, which would queue requests and close the open loop; no bound on a
            # whole request, only on connecting and on the silence between two chunks.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=s.connect_timeout_s, read=s.read_timeout_s),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        """Stream one request over HTTP; raises `EndpointError` on a non-200 status or a broken stream."""
        if self._client is None:
            raise BenchmarkError("the runner is not started; use `async with runner:`")
        priority = PriorityClass.parse(spec.priority).label
        body: dict[str, Any] = {
            "model": self.settings.model,
            "prompt": spec.prompt,
            "max_tokens": spec.max_tokens,
            "temperature": 0.0,
            **self.settings.extra_body,
            "stream": True,
            "priority": priority,
        }
        url = self.settings.url
        async with self._client.stream("POST", url, json=body, headers={PRIORITY_HEADER: priority}) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", errors="replace")
                raise EndpointError(f"HTTP {resp.status_code} from {url}: {text[:300]}")
            count = 0
            async for chunk in sse_chunks(resp):
                if chunk.get("choices"):
                    count += 1
                usage = chunk.get("usage") or {}
                if isinstance(usage.get("completion_tokens"), int):
                    count = max(count, usage["completion_tokens"])
                prompt_tokens = usage.get("prompt_tokens")
                yield StreamEvent(count, prompt_tokens if isinstance(prompt_tokens, int) else None)


async def sse_chunks(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of an OpenAI-style server-sent-event stream, up to `data: [DONE]`; EndpointError when
    the stream ends without it or a chunk is no JSON object or reports an error."""
    async for raw in resp.aiter_lines():
        line = raw.strip()
        if not line.startswith("data:"):
            continue  # SSE comments, event names and the blank separators
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield _parse_chunk(data)
    raise EndpointError("the stream ended without 'data: [DONE]'")


def _parse_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise EndpointError(f"a stream chunk is not JSON: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise EndpointError(f"a stream chunk is not a JSON object: {data[:200]!r}")
    if "error" in chunk:
        raise EndpointError(f"the server reported an error mid-stream: {json.dumps(chunk['error'])[:300]}")
    return chunk
