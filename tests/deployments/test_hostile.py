"""A hostile client over HTTP against the live app: 10,000 generated bodies (deep nesting, huge numbers,
lone surrogates, every field at and past its bounds, wrong types, prompt and message lists at their
limits, streams hung up at random points). Each is answered with a 2xx, or a 4xx carrying the OpenAI error
object; never a 5xx, and a 200 stream never carries an error event. Afterwards no replica holds a KV block
or a request, and a normal request is served.

The seed is printed and named in every failure: QLLM_HOSTILE_SEED=<seed> reruns the same bodies.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import httpx
import pytest

from tests.deployments.hostile_bodies import Hostile, hostile_bodies
from tests.deployments.live import wait_until_idle

pytestmark = pytest.mark.integration

BODIES = int(os.environ.get("QLLM_HOSTILE_BODIES", "10000"))  # fewer only while debugging a seed
CONCURRENCY = 24
ERROR_FIELDS = {"message", "type", "param", "code"}


def _check_error_object(status: int, text: str) -> str | None:
    """What is wrong with a 4xx answer's body, or None."""
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without the OpenAI error object: {text[:200]!r}"
    if set(error) != ERROR_FIELDS or not isinstance(error["message"], str) or not error["message"]:
        return f"{status} with a malformed error object: {error!r}"
    return None


def _check_answer(status: int, text: str) -> str | None:
    if status >= 500 or status < 200 or 300 <= status < 400:
        return f"answered {status}: {text[:300]!r}"
    if status >= 400:
        return _check_error_object(status, text)
    body = json.loads(text)
    return None if body.get("choices") else f"200 without choices: {text[:200]!r}"


async def _stream(client: httpx.AsyncClient, base: str, hostile: Hostile) -> str | None:
    headers = {"content-type": "application/json"}
    async with client.stream("POST", base + hostile.path, content=hostile.body, headers=headers) as r:
        if r.status_code != 200:
            return _check_answer(r.status_code, (await r.aread()).decode(errors="replace"))
        lines = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            lines += 1
            if hostile.hang_up_after is not None and lines > hostile.hang_up_after:
                return None  # the client hangs up here: leaving the block closes the connection
            if line == "data: [DONE]":
                return None
            if "error" in json.loads(line[6:]):
                return f"a 200 stream carried an error event: {line[:300]!r}"
        return None if hostile.hang_up_after is not None else "the stream ended without [DONE]"


async def _one(client: httpx.AsyncClient, base: str, hostile: Hostile) -> str | None:
    if hostile.stream:
        return await _stream(client, base, hostile)
    r = await client.post(base + hostile.path, content=hostile.body, headers={"content-type": "application/json"})
    return _check_answer(r.status_code, r.text)


async def _run(base: str, bodies: list[Hostile]) -> list[tuple[int, Hostile, str]]:
    failures: list[tuple[int, Hostile, str]] = []
    queue: asyncio.Queue[tuple[int, Hostile]] = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def worker() -> None:
            while not queue.empty():
                index, hostile = queue.get_nowait()
                try:
                    problem = await _one(client, base, hostile)
                except httpx.HTTPError as exc:  # the server dropped the connection: as bad as a 5xx
                    problem = f"transport error {exc!r}"
                if problem is not None:
                    failures.append((index, hostile, problem))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return failures


def test_ten_thousand_hostile_bodies_get_no_5xx_and_leave_nothing_held(serve_app: str) -> None:
    seed = int(os.environ.get("QLLM_HOSTILE_SEED") or random.SystemRandom().randrange(2**32))
    print(f"hostile seed={seed} (QLLM_HOSTILE_SEED={seed} reruns these bodies)")
    bodies = hostile_bodies(seed, BODIES)
    failures = asyncio.run(_run(serve_app, bodies))
    shown = "\n".join(f"#{i} {h.kind} {h.path} {h.body[:160]!r}: {problem}" for i, h, problem in failures[:15])
    assert not failures, f"seed {seed}: {len(failures)} of {BODIES} bodies answered wrongly:\n{shown}"
    held = wait_until_idle()
    assert held and all(v == (0, 0) for v in held.values()), f"seed {seed}: still held (KV blocks, requests) {held}"
    ok = httpx.post(f"{serve_app}/v1/completions", json={"prompt": "after", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, f"seed {seed}: {ok.text}"
