"""Ingress: the OpenAI-compatible HTTP API (FastAPI through `@serve.ingress`).

For each request: parse and validate the body (4xx with the OpenAI error object on any fault), ask the
PriorityRouter for admission and a placement, then stream from an engine replica through Ray Serve's
handle. A request whose replica dies before its first token is placed again; a stream already under
way ends with an error event. Tokens never pass through the router.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import ray.exceptions
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.auth import authorized, load_api_key
from deployments.openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    parse_body,
    sse,
    usage_chunk,
)
from deployments.request_log import RequestLog
from deployments.request_router import PLACEMENT_KWARG
from deployments.settings import AppSettings
from qllm_core.errors import InvalidRequestError
from qllm_core.request import PriorityClass

logger = logging.getLogger("ray.serve")

PRIORITY_HEADER = "x-qllm-priority"
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}
# How long an LS request waits for the PriorityRouter before placing by reported load instead.
_LS_ADMIT_TIMEOUT_S = 0.5

app = FastAPI(title="qllm", description="OpenAI-compatible API with latency-sensitive and best-effort classes")


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


def _finish(item: dict[str, Any]) -> str | None:
    reason = item.get("finish_reason")
    return "stop" if reason == "abort" else reason


def _usage(item: dict[str, Any]) -> dict[str, int]:
    completion = item["num_output_tokens"]
    return {
        "prompt_tokens": item["prompt_tokens"],
        "completion_tokens": completion,
        "total_tokens": item["prompt_tokens"] + completion,
    }


Stream = TypeVar("Stream", bound=AsyncIterator[dict[str, Any]])


async def first_item(attempts: int, start: Callable[[], Awaitable[Stream]]) -> tuple[dict[str, Any], Stream]:
    """Start a stream (a new placement each time) and wait for its first item. A replica that dies before
    that item is tried again elsewhere, up to `attempts` placements; nothing was sent to the client yet."""
    failure: Exception | None = None
    for _ in range(attempts):
        stream = await start()
        try:
            return await stream.__anext__(), stream
        except StopAsyncIteration:
            raise ApiError(500, "the engine replica ended the stream without output") from None
        except ray.exceptions.RayError as exc:  # the replica died or is unreachable: try another one
            failure = exc
            logger.warning("replica failed before the first token (%s); placing again", type(exc).__name__)
    raise ApiError(503, f"no engine replica could serve the request ({type(failure).__name__})")


@serve.ingress(app)
class Ingress:
    """A Ray Serve deployment class (decorated in app.py)."""

    def __init__(self, settings: AppSettings, engine: DeploymentHandle, router: DeploymentHandle | None) -> None:
        self._s = settings
        self._model = settings.served_model_name
        self._engine = engine
        self._stream = engine.options(stream=True)
        self._router = router
        self._api_key = load_api_key(settings.api_key_file)

    def _check_key(self, request: Request) -> None:
        if self._api_key is not None and not authorized(request.headers.get("authorization"), self._api_key):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/health")
    async def health(self) -> Response:
        """200 when at least one engine replica answers, else 503."""
        try:
            await asyncio.wait_for(self._engine.ping.remote(), timeout=2.0)
        except Exception as exc:  # any failure means: no replica can serve now
            raise ApiError(503, f"no engine replica is available: {type(exc).__name__}") from None
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        """The one model this application serves."""
        self._check_key(request)
        card = {"id": self._model, "object": "model", "created": 0, "owned_by": "qllm"}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """Text completion, streaming or not."""
        self._check_key(request)
        body = parse_body(await request.body(), CompletionRequest, self._s.max_body_bytes)
        assert isinstance(body, CompletionRequest)  # noqa: S101 - parse_body returns the model it was given
        return await self._serve("completion", body, {"prompt": body.prompt}, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """Chat completion with the model's chat template, streaming or not."""
        self._check_key(request)
        body = parse_body(await request.body(), ChatRequest, self._s.max_body_bytes)
        assert isinstance(body, ChatRequest)  # noqa: S101
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        return await self._serve("chat", body, {"messages": messages}, request)

    # ---- one request --------------------------------------------------------------------------------
    async def _serve(
        self, kind: str, body: CompletionRequest | ChatRequest, prompt: dict[str, Any], request: Request
    ) -> Response:
        if body.model is not None and body.model != self._model:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self._model!r}",
                param="model",
                code="model_not_found",
            )
        priority = self._priority(body.priority or request.headers.get(PRIORITY_HEADER))
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        payload = {
            **prompt,
            "params": body.sampling(DEFAULT_MAX_TOKENS[kind]),
            "priority": priority.label,
            "request_id": request_id,
            "ttft_deadline_s": None if body.ttft_deadline_ms is None else body.ttft_deadline_ms / 1000,
        }
        log = RequestLog(request_id, priority.label, kind, body.stream, prompt=prompt if self._s.log_prompts else None)
        try:
            first, stream = await self._open(payload, priority)
            log.first_item(first)
            if body.stream:
                events = self._events(kind, request_id, first, stream, body.include_usage, log)
                return StreamingResponse(events, media_type="text/event-stream")
            text, item = await self._collect(first, stream)
        except ApiError as exc:
            log.finish(logger, exc.status, error=exc.code or str(exc.status))
            raise
        log.finish(logger, 200, item)
        usage = _usage(item)
        make = chat_body if kind == "chat" else completion_body
        return JSONResponse(make(request_id, self._model, text, _finish(item), usage))

    def _priority(self, value: str | None) -> PriorityClass:
        try:
            return PriorityClass.parse(value if value is not None else self._s.engine.default_priority)
        except InvalidRequestError as exc:
            raise ApiError(400, exc.message, param="priority") from None

    async def _admit(self, priority: PriorityClass) -> dict[str, Any]:
        """The PriorityRouter's placement; on its failure, an empty one (the request router ranks by load)."""
        if self._router is None:  # routing: power_of_two
            return {"priority": priority.label}
        ls = priority is PriorityClass.LATENCY_SENSITIVE
        timeout = _LS_ADMIT_TIMEOUT_S if ls else self._s.be_hold_max_s + 2.0
        try:
            decision: dict[str, Any] = await asyncio.wait_for(self._router.admit.remote(priority.label), timeout)
        except Exception as exc:  # router down or restarting: keep serving with fallback placement
            logger.warning("PriorityRouter unavailable (%s); placing by reported load", type(exc).__name__)
            return {"priority": priority.label}
        if decision.get("overloaded"):
            retry = max(1, round(decision["retry_after_s"]))
            raise ApiError(
                429,
                f"the {priority.label} queue is full; retry in {retry} s",
                code="overloaded",
                headers={"Retry-After": str(retry)},
            )
        return {"priority": priority.label, "ranking": decision["ranking"]}

    async def _open(
        self, payload: dict[str, Any], priority: PriorityClass
    ) -> tuple[dict[str, Any], DeploymentResponseGenerator]:
        """Place the request and wait for its first item, placing it again if its replica dies first."""

        async def start() -> DeploymentResponseGenerator:
            placement = await self._admit(priority)
            return self._stream.generate.remote(payload, **{PLACEMENT_KWARG: placement})  # type: ignore[return-value]

        first, stream = await first_item(self._s.placement_attempts, start)
        if "error" in first:
            err = first["error"]
            raise ApiError(err["status"], err["message"], param=err["param"])
        return first, stream

    async def _collect(self, first: dict[str, Any], stream: DeploymentResponseGenerator) -> tuple[str, dict]:
        parts, item = [first["delta"]], first
        try:
            while not item["finished"]:
                item = await stream.__anext__()
                parts.append(item["delta"])
        except ray.exceptions.RayError as exc:
            raise ApiError(503, f"the engine replica failed mid-request ({type(exc).__name__})") from None
        return "".join(parts), item

    async def _events(
        self,
        kind: str,
        request_id: str,
        first: dict[str, Any],
        stream: DeploymentResponseGenerator,
        include_usage: bool,
        log: RequestLog,
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        item = first
        failed: str | None = None
        try:
            if kind == "chat":
                yield sse(chat_chunk(request_id, self._model, {"role": "assistant", "content": ""}, None))
            while True:
                finish = _finish(item) if item["finished"] else None
                if item["delta"] or finish is not None:
                    if kind == "chat":
                        yield sse(chat_chunk(request_id, self._model, {"content": item["delta"]}, finish))
                    else:
                        yield sse(completion_chunk(request_id, self._model, item["delta"], finish))
                if item["finished"]:
                    if include_usage:
                        yield sse(usage_chunk(request_id, self._model, obj, _usage(item)))
                    break
                item = await stream.__anext__()
        except ray.exceptions.RayError as exc:
            error = ApiError(
                503,
                f"the engine replica failed mid-stream ({type(exc).__name__}); the output above is incomplete",
                code="replica_failed",
            )
            failed = "replica_failed"
            yield sse(error.body())
        finally:
            stream.cancel()  # no-op when finished; aborts the request on the replica if the client left
            # The client leaving ends this generator early: the line says so (status 499, nginx's convention).
            status = 200 if item["finished"] or failed else 499
            log.finish(logger, status, item, error=failed or (None if status == 200 else "client_disconnected"))
        yield sse("[DONE]")
