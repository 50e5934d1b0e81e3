"""The request router's fallback admission on a live app: with the PriorityRouter out of the path, a request
it did not admit is refused when the replicas report its class's queue full, and the refusal reaches the
caller through Ray Serve's handle as `Overloaded` (the ingress turns it into a 429).

A third application on the session cluster: one replica, batches of 2, `max_queued_be=2`. Bounded in
count and time; loopback only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from ray import serve

from deployments.app import build_app
from deployments.protocol import GenerateRequest, Overloaded, PlacementHint, Prompt, Rejected, StreamItem
from qllm_core.params import SamplingParams
from qllm_core.request import PriorityClass
from tests.deployments.conftest import APP_ARGS, wait_healthy

pytestmark = pytest.mark.integration

BE, LS = PriorityClass.BEST_EFFORT, PriorityClass.LATENCY_SENSITIVE
APP = "fallback"


@pytest.fixture(scope="module")
def fallback_app(serve_app: str) -> Iterator[str]:
    args = {
        **APP_ARGS,
        "replicas": 1,
        "max_queued_be": 2,
        "be_hold_max_s": 2.0,
        "engine": {**APP_ARGS["engine"], "max_batch_size": 2},  # type: ignore[dict-item]
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    wait_healthy(f"{serve_app}/{APP}", replicas=1, app=APP)
    yield APP
    serve.delete(APP)


def _request(n: int, priority: PriorityClass, max_tokens: int) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerateRequest(f"fallback-{n}", priority, Prompt(token_ids=tuple(range(3, 203))), params)


async def _scenario(app: str) -> tuple[Rejected | None, object]:
    handle = serve.get_deployment_handle("EngineReplica", app_name=app).options(stream=True)
    # Six long BE requests the PriorityRouter is taken to have admitted: two run, four wait.
    backlog = [
        handle.generate.remote(_request(i, BE, 400), placement=PlacementHint(BE, admitted=True)) for i in range(6)
    ]
    for stream in backlog:
        await stream.__anext__()  # type: ignore[union-attr]
    refused: Rejected | None = None
    deadline = time.monotonic() + 30.0
    n = 100
    while refused is None and time.monotonic() < deadline:
        # Not admitted: the request router admits it on the load the replica reports (every 0.2 s).
        probe = handle.generate.remote(_request(n, BE, 1), placement=PlacementHint(BE))
        n += 1
        try:
            await probe.__anext__()  # type: ignore[union-attr]
        except Overloaded as exc:
            refused = exc.answer  # its routing failed: there is nothing to cancel
        else:
            probe.cancel()  # type: ignore[union-attr]
            await asyncio.sleep(0.2)
    ls = handle.generate.remote(_request(n, LS, 1), placement=PlacementHint(LS))
    first = await ls.__anext__()  # type: ignore[union-attr]
    for stream in [*backlog, ls]:
        stream.cancel()  # type: ignore[union-attr]
    return refused, first


def test_without_the_priority_router_a_full_be_queue_refuses_be_and_still_serves_ls(fallback_app: str) -> None:
    refused, ls_first = asyncio.run(_scenario(fallback_app))
    assert refused == Rejected(BE, 2.0)
    assert isinstance(ls_first, StreamItem)  # the LS queue is not full: LS is served
