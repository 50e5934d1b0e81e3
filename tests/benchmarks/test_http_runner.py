"""The HTTP runner against a real streaming server on 127.0.0.1: a small FastAPI app serving a real tiny
Engine through the OpenAI completions contract (SSE `data:` chunks ending in `data: [DONE]`)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from benchmarks.report import JSON_NAME, write_outputs
from benchmarks.runners import HttpRunner, HttpSettings
from benchmarks.sweep import run_sweep
from benchmarks.sweep_settings import SweepSettings
from benchmarks.workload import LengthDistribution, RequestSpec, Workload, WorkloadSettings, poisson_workload
from qllm_core import Engine, EngineConfig, InvalidRequestError, RequestOutput, SamplingParams

pytestmark = pytest.mark.integration

WIRE_NAME = {"ls": "latency_sensitive", "be": "best_effort"}
"""How the runner must name each class in the body's `priority` and the x-qllm-priority header."""

SMALL = WorkloadSettings(
    num_requests=8,
    ls_share=0.5,
    prompt_len=LengthDistribution(16, 48),
    max_tokens=LengthDistribution(5, 10, sigma=0.5),
    seed=5,
)


@dataclass
class Seen:
    """What the server received: (body priority, header priority, prompt length, max_tokens) per request."""

    requests: list[tuple[str | None, str | None, int, int]] = field(default_factory=list)


def _chunk(model: str, rid: str, text: str, out: RequestOutput) -> str:
    choice = {"index": 0, "text": text, "finish_reason": out.finish_reason.value if out.finish_reason else None}
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "model": model, "choices": [choice]}
    if out.finished:
        body["usage"] = {"prompt_tokens": out.prompt_token_count, "completion_tokens": out.num_output_tokens}
    return f"data: {json.dumps(body)}\n\n"


def make_app(engine: Engine, seen: Seen) -> FastAPI:
    """Just the streaming completions contract qllm's server will offer."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        header = request.headers.get("x-qllm-priority")
        prompt = body["prompt"]
        seen.requests.append((body.get("priority"), header, len(prompt), body["max_tokens"]))
        params = SamplingParams(
            max_tokens=body["max_tokens"], temperature=body.get("temperature", 1.0), ignore_eos=True
        )
        source = {"prompt_token_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
        outputs = engine.generate(params=params, priority=body.get("priority") or header, **source)
        try:
            first = await anext(outputs)  # surfaces a rejected request as a 400 before streaming starts
        except InvalidRequestError as exc:
            return JSONResponse({"error": {"message": str(exc), "param": exc.param}}, status_code=400)
        rid = f"cmpl-{uuid.uuid4().hex[:12]}"

        async def events() -> AsyncIterator[str]:
            out = first
            while True:
                yield _chunk(body["model"], rid, out.text_delta, out)
                if out.finished:
                    break
                out = await anext(outputs)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@dataclass
class Server:
    url: str
    seen: Seen


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    engine = Engine(EngineConfig(model="tiny", device="cpu", policy="qllm", granularity="layer"))
    seen = Seen()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(make_app(engine, seen), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{port}", seen)
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()
        engine.shutdown()


async def test_runner_streams_a_workload_with_priorities(server: Server) -> None:
    workload = poisson_workload(SMALL, rate=30.0)
    async with HttpRunner(HttpSettings(server.url, "tiny")) as runner:
        await runner.warmup(1)
        decode_s = await runner.measure_decode_iteration(batch=2, prompt_len=8, max_tokens=4)
        server.seen.requests.clear()
        records = await runner.run(workload, drain_timeout_s=30)
    assert 0 < decode_s < 1.0
    assert len(records) == len(workload.requests)
    for got, spec in zip(records, workload.requests, strict=True):
        assert got.completed, got.error
        assert got.priority == spec.priority
        assert got.output_tokens == spec.max_tokens
        assert got.prompt_tokens == spec.prompt_len
        assert got.ttft_s is not None and got.ttft_s > 0
        assert got.sent_s <= got.first_token_s <= got.finished_s  # type: ignore[operator]
    # The class travels in the body and in the header, named as the API names it.
    sent = sorted(server.seen.requests)
    expected = sorted(
        (WIRE_NAME[s.priority], WIRE_NAME[s.priority], s.prompt_len or 0, s.max_tokens) for s in workload.requests
    )
    assert sent == expected
    assert {p for p, *_ in sent} == {"latency_sensitive", "best_effort"}


async def test_rejected_and_unreachable_requests_are_recorded_as_failures(server: Server) -> None:
    too_long = RequestSpec(0, 0.0, "ls", 4, prompt_token_ids=(7,) * 5000)
    fine = RequestSpec(1, 0.01, "be", 3, prompt_token_ids=(9,) * 10)
    async with HttpRunner(HttpSettings(server.url + "/v1", "tiny")) as runner:
        bad, good = await runner.run(Workload((too_long, fine), 1.0, "test"), drain_timeout_s=30)
    assert not bad.completed and bad.error is not None and "HTTP 400" in bad.error and "context" in bad.error
    assert bad.first_token_s is None
    assert good.completed and good.output_tokens == 3
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens here now
    async with HttpRunner(HttpSettings(f"http://127.0.0.1:{port}", "tiny")) as runner:
        (lost,) = await runner.run(Workload((fine,), 1.0, "test"), drain_timeout_s=10)
    assert not lost.completed and lost.error is not None and "Connect" in lost.error


def test_sweep_against_the_endpoint_writes_results(server: Server, tmp_path: Path) -> None:
    settings = SweepSettings(
        model="tiny",
        endpoint=server.url,
        endpoint_label="tiny-server",
        rates=(40.0,),
        workload=SMALL,
        slo_s=0.5,
        isolated_points=2,
        isolated_trials=1,
        warmup_requests=1,
        calibration_batch=2,
        calibration_tokens=4,
        drain_timeout_s=30,
        progress=False,
    )
    result = run_sweep(settings)
    write_outputs(result, tmp_path)
    data = json.loads((tmp_path / JSON_NAME).read_text(encoding="utf-8"))
    assert data["meta"]["target"] == server.url + "/v1/completions"
    assert data["meta"]["slo_source"] == "given" and data["meta"]["slo_s"] == 0.5
    (record,) = data["records"]
    assert record["label"] == "tiny-server" and record["policy"] is None and record["rate"] == 40.0
    assert record["metrics"]["completed"] == 8 and record["metrics"]["failed"] == 0
    # The isolated TTFT is measured through the endpoint too, so slowdowns exist; timelines do not travel.
    assert len(record["calibration"]["before"]["ttft_s"]) == 2
    assert all(q["slowdown"] > 0 and q["timeline"] is None for q in record["requests"])
    assert record["metrics"]["ls"]["breakdown"] is None
    assert (tmp_path / "ls_ttft.png").stat().st_size > 0 and (tmp_path / "ls_slowdown_cdf.png").stat().st_size > 0
