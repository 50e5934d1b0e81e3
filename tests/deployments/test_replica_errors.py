"""Errors raised on a live engine replica, through the real path (HTTP, the ingress, Ray Serve's handle, a
replica): what the client did wrong is a 400 naming the field, never a replica taken for dead and retried
(503); a step that raises fails the requests in flight with an explicit error, frees their KV, and the
replica serves on."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from ray import serve

from deployments.protocol import PlacementHint
from qllm_core import PriorityClass
from tests.deployments.live import StreamRead, open_spread, read_stream, replica_ids, wait_until_idle
from tests.deployments.logs import serve_log_text

pytestmark = pytest.mark.integration

RETRIED = "replica failed before the first token"  # the ingress's log line when it places a request again


def _post_raw(base: str, path: str, body: str) -> httpx.Response:
    return httpx.post(base + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
        ("/v1/completions", '{"prompt": ["fine", "\\udfff"], "max_tokens": 1, "echo": true}', "prompt"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 1}', "messages"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "a", "name": "\\ud800"}], "max_tokens": 1}',
            "messages",
        ),
    ],
    ids=["completion", "prompt-list-with-echo", "chat", "chat-name"],
)
def test_a_lone_surrogate_is_a_400_from_the_replica_not_a_dead_replica(
    serve_app: str, path: str, body: str, param: str
) -> None:
    # Pydantic accepts the lone surrogate; the replica's tokenizer is what refuses it (a TypeError there).
    retried_before = serve_log_text().count(RETRIED)
    r = _post_raw(serve_app, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "lone surrogate" in error["message"], error
    assert serve_log_text().count(RETRIED) == retried_before, "the request was placed again"
    ok = httpx.post(f"{serve_app}{path}", json=json.loads(body.replace("\\ud", "ud")), timeout=60)
    assert ok.status_code == 200, ok.text  # the same call with valid text is served


async def _streams(base: str, least: int, victim: str) -> list[StreamRead]:
    """At least `least` long streams on both replicas; once each has a token, the next engine step of replica
    `victim` raises."""

    async def one(client: httpx.AsyncClient, i: int, started: asyncio.Event) -> StreamRead:
        body = {"prompt": f"s{i}", "max_tokens": 400, "stream": True, "ignore_eos": True}
        body["priority"] = "ls" if i % 2 else "be"
        return await read_stream(client, f"{base}/v1/completions", body, started)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50), timeout=120) as client:
        tasks = await open_spread(lambda i, started: one(client, i, started), "faulty", least)
        handle = serve.get_deployment_handle("EngineReplica", app_name="faulty")
        hint = PlacementHint(PriorityClass.LATENCY_SENSITIVE, ranking=(victim,))
        assert await handle.fail_next_step.remote(placement=hint) == victim
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)


def test_a_step_that_raises_fails_its_requests_explicitly_frees_kv_and_the_replica_serves_on(faulty_app: str) -> None:
    before = replica_ids("faulty")
    results = asyncio.run(_streams(faulty_app, 6, before[0]))
    failed = [r for r in results if r.error is not None]
    assert failed, f"no stream was on the replica whose step raised: {results}"
    for r in results:
        assert r.done, r  # every stream ended with [DONE]: in full, or after an explicit error event
        if r.error is not None:
            assert r.error_code == "replica_failed" and r.error["message"], r
    # The rest ran to their end (2000 tokens, one or more per chunk) on the other replica... or were cut.
    held = wait_until_idle("faulty")
    assert all(v == (0, 0) for v in held.values()), f"still held (KV blocks, requests): {held}"
    assert replica_ids("faulty") == before, "the replica was replaced: a raising step must not end it"
    for i in range(4):  # both replicas serve again
        ok = httpx.post(f"{faulty_app}/v1/completions", json={"prompt": f"after {i}", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text
