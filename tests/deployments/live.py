"""What the integration tests ask a live application: every engine replica's own stats (through the handle,
one replica at a time), waiting until they hold nothing, and reading a stream to its end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
from ray import serve

from deployments.protocol import PlacementHint
from qllm_core import PriorityClass
from qllm_core.stats import EngineStats


def replica_ids(app: str = "qllm") -> list[str]:
    """Ids of the replicas the app's PriorityRouter hears from."""
    router = serve.get_deployment_handle("PriorityRouter", app_name=app)
    return sorted(router.stats.remote().result(timeout_s=30).replicas)


def replica_stats(app: str = "qllm") -> dict[str, EngineStats]:
    """Each engine replica's engine stats, asked of that replica itself (a placement naming it)."""
    handle = serve.get_deployment_handle("EngineReplica", app_name=app)
    stats = {}
    for rid in replica_ids(app):
        hint = PlacementHint(PriorityClass.LATENCY_SENSITIVE, ranking=(rid,))
        stats[rid] = handle.stats.remote(placement=hint).result(timeout_s=30)
    return stats


def held(stats: EngineStats) -> tuple[int, int]:
    """(KV blocks in use, requests waiting or running) on one replica."""
    busy = sum(c.waiting + c.ready + c.running for c in stats.classes.values())
    return stats.kv_used_blocks, busy


def wait_until_idle(app: str = "qllm", timeout: float = 30.0) -> dict[str, tuple[int, int]]:
    """Until every replica holds no KV block and runs nothing; returns what each held at the last look
    (all zeros unless `timeout` passed first: the caller asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        now = {rid: held(s) for rid, s in replica_stats(app).items()}
        if (now and all(v == (0, 0) for v in now.values())) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


@dataclass(frozen=True)
class StreamRead:
    """One streamed completion as the client read it."""

    chunks: int
    """Chunks that carried text (a chunk carries one or more tokens' text)."""
    error: dict[str, Any] | None
    """The OpenAI error object of the error event, if one came."""
    done: bool
    """Whether the closing `data: [DONE]` came."""
    first_at: float | None
    """When (monotonic) the first chunk with text came."""
    usage_tokens: int | None
    """Completion tokens from the usage chunk (`stream_options.include_usage`), if one came."""

    @property
    def error_code(self) -> str | None:
        """The error event's code, None without one."""
        return None if self.error is None else str(self.error["code"])


async def read_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, object], started: asyncio.Event | None = None
) -> StreamRead:
    """One streamed call read to its end. `started` is set at the first chunk with text. A non-200 answer, a
    transport error or a timeout raises: only an error event followed by [DONE] counts as an explicit end."""
    chunks, error, done, first_at, usage = 0, None, False, None, None
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                elif event["choices"]:
                    if event["choices"][0]["text"]:
                        chunks += 1
                        first_at = time.monotonic() if first_at is None else first_at
                        if started is not None:
                            started.set()
                elif event.get("usage"):
                    usage = int(event["usage"]["completion_tokens"])
    return StreamRead(chunks, error, done, first_at, usage)


StreamOpener = Callable[[int, asyncio.Event], Coroutine[Any, Any, StreamRead]]
"""Opens stream `i` and reads it to its end, setting the event at its first chunk with text."""


async def open_spread(opener: StreamOpener, app: str, least: int, most: int = 24) -> list[asyncio.Task[StreamRead]]:
    """Open streams one by one, each seen streaming before the next (so load reports spread them), until
    `least` are open and every engine replica of `app` holds some, or `most` are open. Placement follows
    load reports, which lag: a fixed count of streams all landed on one replica now and then."""
    tasks: list[asyncio.Task[StreamRead]] = []
    while len(tasks) < most:
        started = asyncio.Event()
        tasks.append(asyncio.create_task(opener(len(tasks), started)))
        await asyncio.wait_for(started.wait(), timeout=60)
        if len(tasks) >= least:
            now = await asyncio.to_thread(replica_stats, app)
            if now and all(held(s)[1] > 0 for s in now.values()):
                break
    return tasks


def assert_each_ended_explicitly(results: list[StreamRead], whole_chunks: int = 0) -> None:
    """Streams over two replicas, one of which failed: each ended with [DONE], either in full (at least
    `whole_chunks` chunks) or after an explicit replica_failed error event with a message; the failed
    replica's were cut and the other's ran in full."""
    for r in results:
        assert r.done, r
        if r.error is None:
            assert r.chunks >= whole_chunks, r
        else:
            assert r.error_code == "replica_failed" and r.error["message"], r
    assert any(r.error is not None for r in results), "no stream was cut: none was on the failed replica"
    assert any(r.error is None for r in results), "the other replica must finish its streams"
