"""Ingress: the OpenAI-compatible HTTP API (FastAPI through `@serve.ingress`).

For each request: parse and validate the body (4xx with the OpenAI error object on any fault); for BE, ask
the PriorityRouter for admission and a placement (LS skips that round trip: the request router in the
handle admits and places it, `deployments.request_router`); then stream from an engine replica through Ray
Serve's handle. A request whose replica dies before its first token is placed again; a stream already under
way ends with an error event. Tokens never pass through the router.
"""

import asyncio
import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import ray.exceptions
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.auth import Client, load_api_keys
from deployments.choices import Choices
from deployments.limits import Gate
from deployments.openai_api import ApiError, parse_body, read_body, sse
from deployments.openai_requests import ChatRequest, CompletionRequest
from deployments.openai_responses import AnswerFormat
from deployments.protocol import (
    PLACEMENT_KWARG,
    PRIORITY_HEADER,
    AdmitAnswer,
    GenerateRequest,
    Overloaded,
    PlacementHint,
    Rejected,
    StreamError,
    StreamItem,
)
from deployments.request_log import RequestLog
from deployments.settings import AppSettings
from qllm_core import PriorityClass

logger = logging.getLogger("ray.serve")

# How much longer than its hold bound a BE request waits for the PriorityRouter's answer before placing by
# reported load instead (the router is down or restarting).
_ADMIT_SLACK_S = 2.0

# No /docs, /redoc or /openapi.json: they would answer without the API key, and bodies are parsed by hand
# (openai_api), so the generated schema would describe none of them.
app = FastAPI(
    title="qllm",
    description="OpenAI-compatible API with latency-sensitive and best-effort classes",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> Response:
    return _error_response(exc)


def _error_response(exc: ApiError) -> Response:
    # ASCII JSON: a message quoting what the client sent (a lone surrogate included) always encodes.
    return Response(json.dumps(exc.body()), status_code=exc.status, headers=exc.headers, media_type="application/json")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
    return _error_response(ApiError(exc.status_code, str(exc.detail)))


def _task_failed(exc: ray.exceptions.RayTaskError) -> ApiError:
    """An exception raised by the request's own call on a live replica (which turns every error it knows into
    a `StreamError`, so this is a fault of the server): a 500 for this request alone, not retried elsewhere,
    where the same call would fail the same way. Ray's actor errors (the replica died) are not task errors."""
    cause = type(exc.cause).__name__ if getattr(exc, "cause", None) is not None else type(exc).__name__
    logger.error("the engine replica raised %s on a request: %s", cause, exc)
    return ApiError(500, f"the engine replica failed on this request ({cause})", code="internal_error")


Stream = TypeVar("Stream", bound=AsyncIterator[StreamItem | StreamError])


async def first_item(attempts: int, start: Callable[[], Awaitable[Stream]]) -> tuple[StreamItem | StreamError, Stream]:
    """Start a stream (a new placement each time) and wait for its first item. A replica that dies, or whose
    engine has stopped, before that item is tried again elsewhere, up to `attempts` placements; nothing was
    sent to the client yet."""
    failure = "no placement"
    for _ in range(attempts):
        stream = await start()
        try:
            first = await stream.__anext__()
        except asyncio.CancelledError:  # the client left: end the request on its replica too
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()
            raise
        except StopAsyncIteration:
            raise ApiError(500, "the engine replica ended the stream without output") from None
        except ray.exceptions.RayTaskError as exc:  # raised by the request's own code there: not a dead replica
            raise _task_failed(exc) from None
        except ray.exceptions.RayError as exc:  # the replica died or is unreachable: try another one
            failure = type(exc).__name__
        else:
            if not (isinstance(first, StreamError) and first.retryable):
                return first, stream
            failure = first.message
        logger.warning("replica failed before the first token (%s); placing again", failure)
    raise ApiError(503, f"no engine replica could serve the request ({failure})")


async def next_item(stream: AsyncIterator[StreamItem | StreamError]) -> StreamItem:
    """The next item of a request under way. However its replica fails (it died, its engine stopped, the
    stream broke off), the request ends with a 503 `replica_failed`: part of the output may be out already."""
    try:
        item = await stream.__anext__()
    except ray.exceptions.RayTaskError as exc:
        raise _task_failed(exc) from None
    except ray.exceptions.RayError as exc:
        failure = type(exc).__name__
    except StopAsyncIteration:
        failure = "the stream ended before its last item"
    else:
        if isinstance(item, StreamItem):
            return item
        failure = item.message
    raise ApiError(
        503, f"the engine replica failed mid-request ({failure}); the output is incomplete", code="replica_failed"
    )


# Everything the class below uses is defined above it: the class `serve.ingress` makes travels to the
# replicas by value, and a helper defined after it was found missing there (NameError).
async def _collect(first: StreamItem, stream: AsyncIterator[StreamItem | StreamError], choices: Choices) -> None:
    """Read a call's stream until every choice has finished (each finished item carries its whole text)."""
    item = first
    choices.add(item)
    while not choices.finished:
        item = await next_item(stream)
        choices.add(item)


@serve.ingress(app)
class Ingress:
    """A Ray Serve deployment class (decorated in app.py)."""

    def __init__(self, settings: AppSettings, engine: DeploymentHandle, router: DeploymentHandle | None) -> None:
        self._s = settings
        self._model = settings.served_model_name
        self._engine = engine
        self._stream = engine.options(stream=True)
        self._router = router
        self._gate = Gate(settings, load_api_keys(settings.api_key_file))

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
        self._gate.client(request.headers.get("authorization"))
        card = {"id": self._model, "object": "model", "created": 0, "owned_by": "qllm"}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """Text completion of one prompt or a list, streaming or not."""
        client = self._gate.client(request.headers.get("authorization"))
        return await self._serve(parse_body(await self._read_body(request), CompletionRequest), request, client)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """Chat completion with the model's chat template, streaming or not."""
        client = self._gate.client(request.headers.get("authorization"))
        return await self._serve(parse_body(await self._read_body(request), ChatRequest), request, client)

    async def _read_body(self, request: Request) -> bytes:
        return await read_body(request.stream(), request.headers.get("content-length"), self._s.max_body_bytes)

    # ---- one request --------------------------------------------------------------------------------
    async def _serve(self, body: CompletionRequest | ChatRequest, request: Request, client: Client) -> Response:
        self._check_model(body)
        priority = self._gate.priority(client, body.priority or request.headers.get(PRIORITY_HEADER))
        request_id = f"{body.id_prefix}-{uuid.uuid4().hex}"
        payload = body.to_request(request_id, priority, self._gate.deadline_s(body.ttft_deadline_ms))
        self._gate.admit(client, payload)
        answer = body.answer_format(request_id, self._model)
        choices = Choices(payload.choices, payload.n, keep=not body.stream)
        prompts = payload.prompts if self._s.log_prompts else None
        log = RequestLog(request_id, priority.label, body.kind, body.stream, prompts=prompts)
        release = functools.partial(self._gate.release, client, payload)
        streamed = False
        stream: DeploymentResponseGenerator | None = None
        try:
            first, stream = await self._open(payload, priority)
            log.first_item(first)
            if body.stream:
                events = self._events(answer, first, stream, choices, body.include_usage, log, release)
                streamed = True  # the stream releases the call when it ends
                return StreamingResponse(events, media_type="text/event-stream")
            await _collect(first, stream, choices)
        except ApiError as exc:
            log.finish(logger, exc.status, error=exc.code or str(exc.status))
            raise
        except asyncio.CancelledError:  # the client hung up on a call not streamed: Serve cancels this handler
            if stream is not None:
                stream.cancel()
            log.finish(logger, 499, error="client_disconnected")
            raise
        finally:
            if not streamed:
                release()
        log.finish(logger, 200, choices)
        return JSONResponse(answer.body(choices))

    def _check_model(self, body: CompletionRequest | ChatRequest) -> None:
        if body.model is not None and body.model != self._model:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self._model!r}",
                param="model",
                code="model_not_found",
            )

    async def _admit(self, priority: PriorityClass, sequences: int) -> PlacementHint:
        """BE: the PriorityRouter's placement (429 when it rejects the request), or on its failure a hint
        without a ranking. LS: that hint at once, with no round trip: the request router in the handle places
        and admits LS itself, by the same rules, on the load replicas report."""
        if self._router is None or priority is PriorityClass.LATENCY_SENSITIVE:
            return PlacementHint(priority, sequences=sequences)
        try:
            answer: AdmitAnswer = await asyncio.wait_for(
                self._router.admit.remote(priority, sequences), self._s.be_hold_max_s + _ADMIT_SLACK_S
            )
        except Exception as exc:  # router down, restarting or hung: keep serving with fallback placement
            logger.warning("PriorityRouter unavailable (%s); placing by reported load", type(exc).__name__)
            return PlacementHint(priority, sequences=sequences)
        if isinstance(answer, Rejected):
            raise self._overloaded(answer)
        return PlacementHint(priority, answer.ranking, admitted=True, sequences=sequences)

    @staticmethod
    def _overloaded(answer: Rejected) -> ApiError:
        """The 429 for a full queue, whoever found it full (the PriorityRouter, or the fallback admission)."""
        retry = max(1, round(answer.retry_after_s))
        return ApiError(
            429,
            f"the {answer.priority.label} queue is full; retry in {retry} s",
            code="overloaded",
            headers={"Retry-After": str(retry)},
        )

    async def _open(
        self, request: GenerateRequest, priority: PriorityClass
    ) -> tuple[StreamItem, DeploymentResponseGenerator]:
        """Place the request and wait for its first item, placing it again if its replica fails first."""

        async def start() -> DeploymentResponseGenerator:
            placement = await self._admit(priority, request.choices)
            return self._stream.generate.remote(request, **{PLACEMENT_KWARG: placement})  # type: ignore[return-value]

        try:
            first, stream = await first_item(self._s.placement_attempts, start)
        except Overloaded as exc:  # the request router's own admission, while the PriorityRouter is down
            raise self._overloaded(exc.answer) from None
        if isinstance(first, StreamError):
            raise ApiError(first.status, first.message, param=first.param)
        return first, stream

    async def _events(
        self,
        answer: AnswerFormat,
        first: StreamItem,
        stream: DeploymentResponseGenerator,
        choices: Choices,
        include_usage: bool,
        log: RequestLog,
        release: Callable[[], None],
    ) -> AsyncIterator[bytes]:
        item = first
        failed: str | None = None
        try:
            while True:
                for chunk in answer.chunks(item, choices.add(item)):
                    yield sse(chunk)
                if choices.finished:
                    if include_usage:
                        yield sse(answer.usage_chunk(choices.usage()))
                    break
                item = await next_item(stream)
        except ApiError as exc:  # the replica failed mid-stream: say so in the stream, then end it
            failed = exc.code
            yield sse(exc.body())
        finally:
            stream.cancel()  # no-op when finished; aborts the request on the replica if the client left
            release()
            # The client leaving ends this generator early: the line says so (status 499, nginx's convention).
            status = 200 if choices.finished or failed else 499
            log.finish(logger, status, choices, error=failed or (None if status == 200 else "client_disconnected"))
        yield sse("[DONE]")
