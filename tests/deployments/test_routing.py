"""Placement under load: LS is admitted and served ahead of BE; the router tracks SLOs per class."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest
from ray import serve

from deployments.protocol import RouterStats

pytestmark = pytest.mark.integration


async def _ttft(client: httpx.AsyncClient, base: str, priority: str, prompt_len: int, max_tokens: int) -> float:
    body = {
        "prompt": [7 + i % 400 for i in range(prompt_len)],
        "max_tokens": max_tokens,
        "stream": True,
        "priority": priority,
        "ignore_eos": True,
    }
    start = time.monotonic()
    first = None
    async with client.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.monotonic() - start
    assert first is not None
    return first


async def _mixed(base: str) -> tuple[list[float], list[float]]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=200)) as client:
        be = [asyncio.create_task(_ttft(client, base, "be", 1500, 24)) for _ in range(24)]
        await asyncio.sleep(0.3)  # BE prefills are under way on both replicas
        ls = []
        for _ in range(6):
            ls.append(await _ttft(client, base, "ls", 16, 2))
            await asyncio.sleep(0.1)
        return ls, list(await asyncio.gather(*be))


def test_ls_is_served_ahead_of_be_under_load(serve_app: str) -> None:
    ls, be = asyncio.run(_mixed(serve_app))
    assert statistics.median(ls) < statistics.median(be) / 2, (ls, be)
    assert max(ls) < max(be), (ls, be)


def test_router_tracks_placements_and_slo_attainment(serve_app: str) -> None:
    # Self-contained: it sends its own traffic, so it passes alone or after any other test.
    router = serve.get_deployment_handle("PriorityRouter", app_name="qllm")
    before = router.stats.remote().result(timeout_s=30)
    for priority in ("be", "ls", "be", "ls"):
        body = {"prompt": "placed", "max_tokens": 2, "priority": priority}
        assert httpx.post(f"{serve_app}/v1/completions", json=body, timeout=60).status_code == 200
    deadline = time.monotonic() + 30
    while True:  # the LS TTFTs reach the router with the replicas' next reports
        stats = router.stats.remote().result(timeout_s=30)
        attainments = [o.ls_attainment for o in stats.replicas.values()]
        if any(a is not None for a in attainments) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert isinstance(stats, RouterStats)
    # LS is placed by the ingress's request router, with no round trip to this router; BE goes through it.
    assert stats.placed_ls == before.placed_ls == 0
    assert stats.placed_be - before.placed_be == 2
    assert len(stats.replicas) == 2
    assert any(a is not None for a in attainments), "the LS requests were not seen in the replicas' reports"
    assert all(a is None or 0 <= a <= 1 for a in attainments)
