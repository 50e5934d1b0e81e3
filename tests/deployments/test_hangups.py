"""A client that hangs up on a call that is not streamed: the request is aborted on its replica (its KV
freed) and the ingress writes its log line with status 499."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.deployments.live import replica_stats, wait_until_idle
from tests.deployments.logs import serve_log_lines

pytestmark = pytest.mark.integration


def _running() -> bool:
    return any(s.kv_used_blocks > 0 for s in replica_stats().values())


async def _hang_up(base: str, prompt: str) -> None:
    body = {"prompt": prompt, "max_tokens": 3000, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120) as client:
        call = asyncio.create_task(client.post(f"{base}/v1/completions", json=body))
        for _ in range(600):  # until the request holds KV on a replica (it is decoding), at most ~60 s
            if await asyncio.to_thread(_running):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the request never started on a replica")
        call.cancel()  # the client goes away: httpx closes the connection
        with pytest.raises(asyncio.CancelledError):
            await call


def _lines_499() -> list[str]:
    return [line for line in serve_log_lines("qllm", "status=499", timeout=0) if "stream=false" in line]


def test_a_client_that_hangs_up_on_a_whole_answer_gets_a_499_line_and_its_kv_freed(serve_app: str) -> None:
    before = len(_lines_499())
    asyncio.run(_hang_up(serve_app, "hang up on me"))
    held = wait_until_idle()
    assert all(v == (0, 0) for v in held.values()), f"the abandoned request still holds (KV blocks, requests) {held}"
    deadline = time.monotonic() + 15
    while len(_lines_499()) == before:  # the line is written when the handler is cancelled
        assert time.monotonic() < deadline, "no 499 line for the abandoned call"
        time.sleep(0.2)
    (line,) = _lines_499()[before:]
    assert "error=client_disconnected" in line and "class=latency_sensitive" in line, line
