"""What the integration tests ask a live application: every engine replica's own stats (through the handle,
one replica at a time), waiting until they hold nothing, and reading a stream to its end."""

from __future__ import annotations

import asyncio
import json
import time

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


async def read_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, object], started: asyncio.Event | None = None
) -> dict[str, object]:
    """One streamed call read to its end: chunks with text ("tokens"), the error event if one came, and
    whether [DONE] came. `started` is set at the first chunk. A non-200 answer, a transport error or a
    timeout raises: only an error event followed by [DONE] counts as an explicit end."""
    tokens, error, done = 0, None, False
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                else:
                    tokens += 1
                    if started is not None:
                        started.set()
    return {"tokens": tokens, "error": error, "done": done}
