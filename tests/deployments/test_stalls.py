"""Stalls, live through the fault hooks (deployments/faults.py): an engine loop that stops turning while it
has work fails its replica's health check, Serve replaces the replica and every request there ends
explicitly; a PriorityRouter that hangs (its event loop blocked) leaves BE served by the fallback placement."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import ray.exceptions
from ray import serve

from deployments.protocol import PlacementHint
from qllm_core import PriorityClass
from tests.deployments.conftest import STALL_BOUND_S, wait_healthy, wait_replaced
from tests.deployments.live import StreamRead, assert_each_ended_explicitly, open_spread, read_stream, replica_ids
from tests.deployments.logs import serve_log_lines

pytestmark = pytest.mark.integration

REPLACED_WITHIN_S = STALL_BOUND_S + 110.0
"""The stall bound, three failed checks 2 s apart, and a new replica's start on a loaded CPU."""


async def _stream(client: httpx.AsyncClient, base: str, i: int, started: asyncio.Event) -> StreamRead:
    body = {"prompt": f"stall {i}", "max_tokens": 400, "stream": True, "ignore_eos": True}
    return await read_stream(client, f"{base}/v1/completions", body, started)


async def _stall_under_load(base: str, victim: str) -> list[StreamRead]:
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(limits=limits, timeout=REPLACED_WITHIN_S + 60) as client:
        tasks = await open_spread(lambda i, started: _stream(client, base, i, started), "faulty", least=6)
        handle = serve.get_deployment_handle("EngineReplica", app_name="faulty")
        hint = PlacementHint(PriorityClass.LATENCY_SENSITIVE, ranking=(victim,))
        assert await handle.stall_engine_loop.remote(600.0, placement=hint) == victim
        return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=REPLACED_WITHIN_S + 60))


def test_a_stalled_engine_is_replaced_and_its_requests_end_explicitly(faulty_app: str) -> None:
    wait_healthy(faulty_app, replicas=2, app="faulty")
    victim = replica_ids("faulty")[0]
    results = asyncio.run(_stall_under_load(faulty_app, victim))
    assert_each_ended_explicitly(results)  # the stalled replica's once it was replaced
    wait_replaced(faulty_app, victim, REPLACED_WITHIN_S, app="faulty")
    ok = httpx.post(f"{faulty_app}/v1/completions", json={"prompt": "after", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text


def _router_answers() -> bool:
    router = serve.get_deployment_handle("PriorityRouter", app_name="faulty")
    try:
        router.stats.remote().result(timeout_s=1)
    except (TimeoutError, ray.exceptions.RayError):
        return False
    return True


def test_a_hung_router_leaves_be_served_by_the_fallback(faulty_app: str) -> None:
    wait_healthy(faulty_app, replicas=2, app="faulty")
    fallback_before = len(serve_log_lines("faulty", "PriorityRouter unavailable", timeout=0))
    router = serve.get_deployment_handle("PriorityRouter", app_name="faulty")
    hung = router.hang.remote(20.0)  # kept: it answers when the hang ends
    deadline = time.monotonic() + 30
    while _router_answers():  # until the hang has begun
        assert time.monotonic() < deadline, "the router never hung"

    async def be_calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"prompt": "while hung", "max_tokens": 2, "priority": "be"}
            return list(
                await asyncio.gather(*(client.post(f"{faulty_app}/v1/completions", json=body) for _ in range(3)))
            )

    answers = asyncio.run(be_calls())
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2 for r in answers), [
        r.text for r in answers
    ]
    assert len(serve_log_lines("faulty", "PriorityRouter unavailable", timeout=0)) >= fallback_before + 3
    hung.result(timeout_s=120)  # the hang ends; the router answers again
    assert _router_answers()
