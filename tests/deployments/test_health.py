"""Health that means it: an engine replica whose engine loop died fails its health checks and Serve replaces
it, while every request that was in flight there ends with an explicit error (or is placed again)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import httpx
import pytest
import ray.exceptions
from ray import serve

from deployments.faults import FAULT_INJECTION_ENV
from deployments.replica import EngineReplica
from deployments.settings import AppSettings
from qllm_core.errors import ConfigError, EngineStalledError
from tests.deployments.conftest import engine_replica_actors, wait_replaced
from tests.deployments.live import StreamRead, assert_each_ended_explicitly, open_spread, read_stream

LONG = 400
"""Tokens per long request: enough that every one is still decoding when the loop is killed."""
STREAMS = 8
"""Long streams, and as many long whole answers, in flight when the loop is killed."""
AFTER = 6
"""Short requests sent just after the kill: they have no token yet anywhere."""
REPLACED_WITHIN_S = 120.0
"""Bound on Serve replacing the victim: three failed health checks 2 s apart, then a new replica's start."""


class _Engine:
    """Stands in for the engine: records the bound it is checked against, raises what it is given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.bounds: list[float] = []
        self.error = error

    def check_health(self, stall_timeout_s: float) -> None:
        self.bounds.append(stall_timeout_s)
        if self.error is not None:
            raise self.error

    def shutdown(self, timeout: float) -> None:
        pass


def _replica(engine: _Engine, settings: AppSettings) -> EngineReplica:
    replica = object.__new__(EngineReplica)  # no Serve replica context here: only what check_health reads
    replica._engine = engine  # type: ignore[assignment]
    replica._settings = settings
    return replica


def test_the_health_check_asks_the_engine_with_the_configured_stall_bound() -> None:
    healthy = _Engine()
    _replica(healthy, AppSettings(engine_stall_timeout_s=7.5)).check_health()
    assert healthy.bounds == [7.5]
    stalled = _Engine(EngineStalledError("the engine loop has had work but finished no step for 8 s"))
    with pytest.raises(EngineStalledError):
        _replica(stalled, AppSettings(engine_stall_timeout_s=7.5)).check_health()


def test_the_stall_bound_defaults_to_a_minute_and_must_be_positive() -> None:
    assert AppSettings().engine_stall_timeout_s == 60.0
    with pytest.raises(ConfigError, match="engine_stall_timeout_s"):
        AppSettings.from_dict({"engine_stall_timeout_s": 0})


async def _stream(client: httpx.AsyncClient, base: str, i: int, started: asyncio.Event) -> StreamRead:
    body = {"prompt": f"stream {i}", "max_tokens": LONG, "stream": True, "ignore_eos": True}
    body["priority"] = "ls" if i % 2 else "be"
    return await read_stream(client, f"{base}/v1/completions", body, started)


async def _post(client: httpx.AsyncClient, base: str, max_tokens: int) -> httpx.Response:
    body = {"prompt": "whole", "max_tokens": max_tokens, "ignore_eos": True}
    return await client.post(f"{base}/v1/completions", json=body, timeout=120)


async def _kill_loop_under_load(base: str) -> tuple[str, list[StreamRead], list[httpx.Response]]:
    """Long streams and whole answers on both replicas; kill one engine loop; requests keep arriving."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=100), timeout=120) as client:
        whole: list[asyncio.Task[httpx.Response]] = []

        def opener(i: int, started: asyncio.Event) -> Coroutine[Any, Any, StreamRead]:
            whole.append(asyncio.create_task(_post(client, base, LONG)))
            return _stream(client, base, i, started)

        streams = await open_spread(opener, "faulty", least=STREAMS)
        handle = serve.get_deployment_handle("EngineReplica", app_name="faulty")
        victim = await handle.kill_engine_loop.remote()
        after = [asyncio.create_task(_post(client, base, 4)) for _ in range(AFTER)]
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=180)
        answers = await asyncio.wait_for(asyncio.gather(*whole, *after), timeout=180)
    return victim, list(results), list(answers)


@pytest.mark.integration
def test_a_dead_engine_loop_ends_its_requests_explicitly_and_serve_replaces_the_replica(faulty_app: str) -> None:
    before = engine_replica_actors("faulty")
    victim, streams, answers = asyncio.run(_kill_loop_under_load(faulty_app))
    assert any(victim in name for name in before)
    assert_each_ended_explicitly(streams, whole_chunks=LONG // 8)  # a chunk carries one or more tokens' text
    # Whole answers: complete, or an explicit 503 (cut mid-way, or every placement landed on the victim).
    for r, asked in zip(answers, [LONG] * len(streams) + [4] * AFTER, strict=True):
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == asked
        else:
            assert r.json()["error"]["message"], r.text
    print(f"whole answers: {[r.status_code for r in answers]}")
    # The victim fails its health checks and Serve replaces it (with a check that never fails, it stays).
    wait_replaced(faulty_app, victim, REPLACED_WITHIN_S, app="faulty")
    ok = httpx.post(f"{faulty_app}/v1/completions", json={"prompt": "after", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.integration
def test_the_fault_hook_is_refused_where_fault_injection_is_off(serve_app: str) -> None:
    handle = serve.get_deployment_handle("EngineReplica", app_name="qllm")
    with pytest.raises(ray.exceptions.RayTaskError, match=FAULT_INJECTION_ENV):
        handle.kill_engine_loop.remote().result(timeout_s=60)
    assert httpx.post(f"{serve_app}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60).is_success
