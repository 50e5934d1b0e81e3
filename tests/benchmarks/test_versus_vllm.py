"""The versus-vLLM run's client and measurements against a stub OpenAI server on 127.0.0.1 (SSE chunks with
usage, as vLLM and qllm stream them), and its pure parts (the decode window, the rate search, the access log
it reads qllm's engine TTFTs from, the config it serves qllm with)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from benchmarks.metrics import RequestRecord
from benchmarks.runners import EndpointError, HttpSettings
from benchmarks.versus_vllm import ratios
from benchmarks.versus_vllm_client import CallTimes, PriorityWire, PromptSource, StreamingRunner
from benchmarks.versus_vllm_measure import (
    batch_decode,
    decode_window,
    idle_ttft,
    kept_up,
    lone_decode,
    sustained_rate,
    with_fresh_prompts,
)
from benchmarks.versus_vllm_servers import parse_access_log, qllm_config
from benchmarks.workload import RequestSpec, Workload
from deployments.protocol import StreamItem
from deployments.request_log import RequestLog
from deployments.settings import AppSettings

MAX_PROMPT = 100
"""The stub rejects longer prompts with a 400, as a server rejects a prompt beyond its context."""


@dataclass
class Stub:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    cut_short: bool = False
    """Streams end without `data: [DONE]`."""


def _chunk(rid: str, n: int, prompt_len: int, finished: bool) -> str:
    choice = {"index": 0, "text": f" t{n}", "finish_reason": "length" if finished else None}
    usage = {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}
    return "data: " + json.dumps({"id": rid, "object": "text_completion", "choices": [choice], "usage": usage}) + "\n\n"


def make_app(stub: Stub) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        stub.bodies.append(body)
        if len(body["prompt"]) > MAX_PROMPT:
            return JSONResponse({"error": {"message": "prompt too long", "type": "BadRequestError"}}, status_code=400)
        rid = f"cmpl-{len(stub.bodies)}"

        async def events() -> AsyncIterator[str]:
            for n in range(1, body["max_tokens"] + 1):
                await asyncio.sleep(0.002)  # tokens a step apart, so a batch decodes over a window
                yield _chunk(rid, n, len(body["prompt"]), n == body["max_tokens"])
            if not stub.cut_short:
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub() -> Iterator[Stub]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    found = Stub(f"http://127.0.0.1:{sock.getsockname()[1]}")
    uv = uvicorn.Server(uvicorn.Config(make_app(found), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the stub server did not start")
        time.sleep(0.02)
    try:
        yield found
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture()
def fresh(stub: Stub) -> Stub:
    stub.bodies.clear()
    stub.cut_short = False
    return stub


def runner(stub: Stub, wire: PriorityWire = PriorityWire.VLLM) -> StreamingRunner:
    return StreamingRunner(HttpSettings(stub.url, "m", "stub"), wire)


async def test_a_call_times_every_token_and_keeps_the_response_id(fresh: Stub) -> None:
    async with runner(fresh) as r:
        call = await r.call(PromptSource().spec(20, 5))
    assert len(call.token_s) == 5
    assert call.response_id == "cmpl-1"
    assert call.prompt_tokens == 20
    assert call.sent_s < call.token_s[0] <= call.token_s[-1]
    body = fresh.bodies[0]
    assert body["ignore_eos"] is True and body["stream"] is True and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


async def test_the_class_goes_as_vllms_integer_priority_or_qllms_class_name(fresh: Stub) -> None:
    prompts = PromptSource()
    for wire in (PriorityWire.VLLM, PriorityWire.QLLM):
        async with runner(fresh, wire) as r:
            await r.call(prompts.spec(8, 2, "ls"))
            await r.call(prompts.spec(8, 2, "be"))
    assert [b["priority"] for b in fresh.bodies] == [0, 1, "latency_sensitive", "best_effort"]


async def test_idle_ttft_keeps_the_least_of_its_trials_for_each_length(fresh: Stub) -> None:
    async with runner(fresh) as r:
        points = await idle_ttft(r, PromptSource(), (16, 64), trials=3)
    assert [p.prompt_len for p in points] == [16, 64]
    for p in points:
        assert len(p.samples_s) == 3 and p.min_s == min(p.samples_s)
        assert len(set(p.response_ids)) == 3
    assert [len(b["prompt"]) for b in fresh.bodies] == [16, 16, 16, 64, 64, 64]
    assert all(b["max_tokens"] == 1 for b in fresh.bodies)


async def test_no_two_calls_share_a_prompt_or_its_first_two_tokens(fresh: Stub) -> None:
    async with runner(fresh) as r:
        await idle_ttft(r, PromptSource(), (16, 16), trials=4)
        await lone_decode(r, PromptSource(seed=1), trials=2, output_tokens=4)
    heads = [tuple(b["prompt"][:2]) for b in fresh.bodies[:8]]
    assert len(set(heads)) == 8
    assert len({tuple(b["prompt"]) for b in fresh.bodies}) == len(fresh.bodies)


async def test_lone_decode_is_the_median_of_its_calls_mean_token_gaps(fresh: Stub) -> None:
    async with runner(fresh) as r:
        got = await lone_decode(r, PromptSource(), trials=3, prompt_len=16, output_tokens=6)
    assert sorted(got.samples_s)[1] == got.median_s
    assert all(s > 0 for s in got.samples_s)
    assert [b["max_tokens"] for b in fresh.bodies] == [6, 6, 6]


async def test_batch_decode_counts_only_tokens_while_the_whole_batch_decodes(fresh: Stub) -> None:
    async with runner(fresh) as r:
        got = await batch_decode(r, PromptSource(), batch=4, prompt_len=8, output_tokens=10)
    assert len(fresh.bodies) == 4
    assert 0 < got.tokens_in_window <= 4 * 9  # never a first token: the window opens at the last of them
    assert got.tokens_per_s == got.tokens_in_window / got.window_s


async def test_a_rejected_request_raises_with_the_servers_status(fresh: Stub) -> None:
    async with runner(fresh) as r:
        with pytest.raises(EndpointError, match="HTTP 400"):
            await r.call(PromptSource().spec(MAX_PROMPT + 1, 2))


async def test_a_stream_cut_before_done_is_an_error(fresh: Stub) -> None:
    fresh.cut_short = True
    async with runner(fresh) as r:
        with pytest.raises(EndpointError, match=r"\[DONE\]"):
            await r.call(PromptSource().spec(8, 2))


async def test_an_open_loop_run_goes_through_the_same_client(fresh: Stub) -> None:
    prompts = PromptSource()
    specs = tuple(RequestSpec(i, 0.01 * i, "ls" if i % 2 else "be", 3, prompts.prompt(10)) for i in range(4))
    async with runner(fresh, PriorityWire.QLLM) as r:
        records = await r.run(Workload(specs, 100.0, "test"), drain_timeout_s=30)
    assert [rec.output_tokens for rec in records] == [3, 3, 3, 3]
    assert all(rec.completed for rec in records)


def test_the_decode_window_spans_from_the_last_first_token_to_the_first_last_token() -> None:
    a = CallTimes(0.0, (1.0, 2.0, 3.0, 4.0), None, 8)
    b = CallTimes(0.0, (2.5, 3.5, 4.5, 5.5), None, 8)
    window, tokens = decode_window([a, b])
    assert window == 1.5  # 2.5 -> 4.0
    assert tokens == 3  # a's 3.0 and 4.0, b's 3.5


def _record(i: int, finished: float | None) -> RequestRecord:
    return RequestRecord(i, "be", float(i), float(i), None if finished is None else finished - 0.5, finished, 2, 8)


def test_a_run_keeps_up_when_its_last_request_ends_within_the_drain_limit() -> None:
    specs = tuple(RequestSpec(i, float(i), "be", 2, (3, 4)) for i in range(3))
    workload = Workload(specs, 1.0, "t")
    assert kept_up([_record(0, 1.0), _record(1, 2.0), _record(2, 6.9)], workload, 5.0).kept_up
    late = kept_up([_record(0, 1.0), _record(1, 2.0), _record(2, 7.5)], workload, 5.0)
    assert not late.kept_up and late.drain_s == 5.5
    failed = kept_up([_record(0, 1.0), _record(1, None), _record(2, 3.0)], workload, 5.0)
    assert not failed.kept_up and failed.completed == 2 and failed.drain_s is None


class _RateLimited(StreamingRunner):
    """Keeps up with any rate up to `limit`, and no faster (no server: `run` is replaced)."""

    def __init__(self, limit: float) -> None:
        super().__init__(HttpSettings("http://127.0.0.1:9", "m"), PriorityWire.VLLM)
        self.limit = limit

    async def run(self, workload: Workload, drain_timeout_s: float = 120.0, on_done: Any = None) -> list[RequestRecord]:
        end = workload.span_s + (1.0 if workload.rate <= self.limit else 60.0)
        return [
            _record(r.index, end if r.index == len(workload.requests) - 1 else r.arrival_s + 0.1)
            for r in workload.requests
        ]


async def test_the_rate_search_doubles_until_lost_then_bisects() -> None:
    specs = tuple(RequestSpec(i, float(i), "be", 2, (3, 4)) for i in range(4))
    base = Workload(specs, 1.0, "t")
    found = await sustained_rate(_RateLimited(3.0), base.scaled_to, start_rps=1.0, drain_limit_s=5.0, bisections=3)
    assert [t.rate_rps for t in found.trials] == [1.0, 2.0, 4.0, 3.0, 3.5, 3.25]
    assert found.rate_rps == 3.0


async def test_a_rate_search_lost_at_its_first_rate_halves_until_one_is_kept() -> None:
    specs = tuple(RequestSpec(i, float(i), "be", 2, (3, 4)) for i in range(4))
    found = await sustained_rate(_RateLimited(0.3), Workload(specs, 1.0, "t").scaled_to, 1.0, 5.0, bisections=3)
    assert [t.rate_rps for t in found.trials] == [1.0, 0.5, 0.25, 0.375, 0.3125, 0.28125]
    assert found.rate_rps == 0.28125


async def test_a_rate_search_that_keeps_up_with_no_rate_finds_none() -> None:
    specs = tuple(RequestSpec(i, float(i), "be", 2, (3, 4)) for i in range(4))
    base = Workload(specs, 1.0, "t")
    found = await sustained_rate(_RateLimited(0.01), base.scaled_to, 1.0, 5.0, halvings=2)
    assert found.rate_rps is None and [t.rate_rps for t in found.trials] == [1.0, 0.5, 0.25]


def test_fresh_prompts_keep_each_requests_length_and_share_none() -> None:
    specs = tuple(RequestSpec(i, float(i), "be", 2, (5,) * (10 + i)) for i in range(3))
    out = with_fresh_prompts(Workload(specs, 1.0, "t"), PromptSource())
    assert [r.prompt_len for r in out.requests] == [10, 11, 12]
    assert len({r.prompt_token_ids for r in out.requests}) == 3
    assert [r.arrival_s for r in out.requests] == [0.0, 1.0, 2.0]


def test_the_engine_ttft_is_read_back_from_qllms_own_access_log_line() -> None:
    log = RequestLog("cmpl-abc123", "latency_sensitive", "completion", True)
    log.first_item(StreamItem("x", (1,), 1, 4, False, None, 0.0421, "replica-1"))
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test_versus_vllm.access")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    log.finish(logger, 200)
    parsed = parse_access_log("INFO 2026-12-05 replica.py:12 -- " + records[0] + "\n")
    assert list(parsed) == ["cmpl-abc123"]
    assert parsed["cmpl-abc123"].engine_ttft_s == pytest.approx(0.0421)


def test_qllms_served_config_is_one_replica_on_one_cpu_and_valid() -> None:
    config = qllm_config(__import__("pathlib").Path("/models/bench"), 8123)
    (app,) = config["applications"]
    settings = AppSettings.from_dict(app["args"])
    assert settings.replicas == 1 and settings.num_cpus == 1
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}


def test_ratios_put_qllm_over_vllm_for_the_figures_both_have() -> None:
    from benchmarks.versus_vllm_measure import LoneDecode

    got = ratios(
        {"vllm": {"lone_decode": LoneDecode(16, 64, 0.01, ())}, "qllm": {"lone_decode": LoneDecode(16, 64, 0.02, ())}}
    )
    assert got == {"lone_decode_tpot": 2.0}
