"""The async front of the engine: `generate`, `abort`, `stats`, with the step loop in its own thread.

Callers on any thread or event loop submit through a command queue; the loop thread owns the
`EngineCore` alone, so the core needs no locks. Outputs travel back to each caller's event loop with
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from qllm_core.config import EngineConfig
from qllm_core.engine_core import EngineCore
from qllm_core.errors import EngineStalledError, EngineStoppedError, InvalidRequestError, RequestFailedError
from qllm_core.metrics import EngineMetrics
from qllm_core.models.registry import LoadedModel
from qllm_core.outputs import RequestOutput
from qllm_core.params import SamplingParams
from qllm_core.request import PriorityClass
from qllm_core.stats import EngineStats

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


@dataclass(frozen=True)
class Command:
    """Work for the loop thread. `fail` hands an exception `run` raised to the caller who queued it: a
    command that raises fails its caller alone, never the loop."""

    run: Callable[[], object]
    fail: Callable[[BaseException], object]


def _log_failure(exc: BaseException) -> None:
    logger.error("an engine command failed: %s: %s", type(exc).__name__, exc)


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        # A closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Engine:
    """One engine on one device. Thread-safe; any number of concurrent `generate` calls."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        metrics: EngineMetrics | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        """`loaded` shares a model already loaded for this config (benchmarks run many engines on one)."""
        self.config = config if config is not None else EngineConfig()
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self._core = EngineCore(self.config, self.metrics, loaded=loaded)
        self.tokenizer = self._core.loaded.tokenizer
        self.max_model_len = self._core.loaded.max_model_len
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._subscribers: dict[str, _Subscriber] = {}
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = set()
        """Callers waiting for a command's answer; settled with EngineStoppedError if the loop dies first."""
        self._ids = itertools.count()
        self._stats = self._core.stats()
        self._stopping = threading.Event()
        self._dead: str | None = None
        self._turn_ended = time.monotonic()
        """When the loop last finished a turn (a step, or an idle wait): what `check_health` judges."""
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="qllm-engine", daemon=True)
        self._thread.start()

    # ---- public API ----------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        priority: PriorityClass | str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
        ttft_deadline_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs, each carrying what is new since the one before (the finished one
        also the whole text). Bad input raises `InvalidRequestError` here, at the call."""
        if (prompt is None) == (prompt_token_ids is None):
            raise InvalidRequestError("give exactly one of prompt (text) or prompt_token_ids", param="prompt")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise InvalidRequestError("prompt must be a non-empty string", param="prompt")
            prompt_token_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        elif not isinstance(prompt_token_ids, list):
            raise InvalidRequestError("prompt_token_ids must be a list of integers", param="prompt_token_ids")
        params = params if params is not None else SamplingParams()
        cls = PriorityClass.parse(priority if priority is not None else self.config.default_priority)
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex[:16]}"
        assert prompt_token_ids is not None  # noqa: S101
        return self._stream(rid, list(prompt_token_ids), params, cls, ttft_deadline_s)

    async def _stream(
        self, rid: str, ids: list[int], params: SamplingParams, cls: PriorityClass, deadline: float | None
    ) -> AsyncIterator[RequestOutput]:
        self._check_alive()
        # Arrival is now, not when the engine thread next looks at its commands (after the running pass).
        arrival = time.monotonic()
        sub = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())
        accepted: asyncio.Future[None] = sub.loop.create_future()

        def add() -> None:
            try:
                self._core.add_request(rid, ids, params, cls, deadline, arrival)
            except Exception as exc:  # handed to the caller, who sees the typed error
                sub.loop.call_soon_threadsafe(_settle, accepted, exc)
                return
            self._subscribers[rid] = sub
            sub.loop.call_soon_threadsafe(_settle, accepted, None)

        waiter = (sub.loop, accepted)
        self._waiters.add(waiter)
        self._commands.put(Command(add, lambda exc: sub.loop.call_soon_threadsafe(_settle, accepted, exc)))
        finished = False
        try:
            try:
                await accepted
            finally:
                self._waiters.discard(waiter)
            while True:
                item = await sub.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            # Cancelled or closed before its end, even before the engine accepted it: the abort is queued
            # behind the add (commands run in order), so the request never runs on holding KV. It applies only
            # to this caller's request (an add refused as a duplicate id must not abort the other one).
            if not finished:
                self._commands.put(Command(lambda: self._abort_subscribed(rid, sub), _log_failure))

    async def abort(self, request_id: str) -> bool:
        """Abort a request and free what it holds; False when it is unknown or already finished."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        waiter = (loop, done)
        self._waiters.add(waiter)
        self._commands.put(
            Command(
                lambda: loop.call_soon_threadsafe(_settle, done, self._abort_now(request_id)),
                lambda exc: loop.call_soon_threadsafe(_settle, done, exc),
            )
        )
        try:
            return await done
        finally:
            self._waiters.discard(waiter)

    def stats(self) -> EngineStats:
        """The latest snapshot of queues, running work, KV usage and recent TTFTs (refreshed every step; the
        stage shown for a pass running on uninterrupted may lag, and nothing else changes meanwhile)."""
        return self._stats

    def check_health(self, stall_timeout_s: float) -> None:
        """Raise unless the step loop is alive and, while it has work, finished a turn within `stall_timeout_s`.

        `EngineStoppedError`: the loop died or was shut down (every request in flight has been failed).
        `EngineStalledError`: it has work but has been inside one turn for longer than the bound.
        """
        if self._dead is not None or not self._thread.is_alive():
            raise EngineStoppedError(f"the engine loop is not running: {self._dead or 'its thread exited'}")
        stalled = time.monotonic() - self._turn_ended
        if self._busy and stalled > stall_timeout_s:
            raise EngineStalledError(
                f"the engine loop has had work but finished no step for {stalled:.1f} s (bound {stall_timeout_s} s)"
            )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight end with `EngineStoppedError`."""
        self._stopping.set()
        self._commands.put(Command(lambda: None, _log_failure))
        self._thread.join(timeout)

    # ---- the loop thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self._core.has_work())
                outputs: list[RequestOutput] = []
                self._busy = self._core.has_work()
                if self._busy:
                    try:
                        # Running on until a command is queued: an arrival is seen at the next preemption point.
                        outputs = self._core.step(interrupted=self._commands_waiting)
                    except Exception:  # a bug must not hang callers: fail them, keep serving
                        logger.exception("engine step failed; failing the requests in flight")
                        outputs = self._core.fail_all(traceback.format_exc(limit=1).strip())
                # The snapshot first: a caller that has seen an output then sees stats at least as new.
                self._stats = self._core.stats()
                self._publish(outputs)
                self._turn_ended = time.monotonic()
        except BaseException as exc:
            self._dead = f"the engine loop died: {type(exc).__name__}: {exc}"
            logger.exception("the engine loop died")
            raise
        finally:
            self._dead = self._dead or "the engine was shut down"
            for sub in self._subscribers.values():
                sub.put(EngineStoppedError(self._dead))
            self._subscribers.clear()
            # Commands queued behind the one that killed the loop never run: their callers must not wait on.
            stopped = EngineStoppedError(self._dead)
            for loop, future in list(self._waiters):
                with contextlib.suppress(RuntimeError):  # that caller's loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, future, stopped)

    def _commands_waiting(self) -> bool:
        return not self._commands.empty()

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                command.run()
            except Exception as exc:  # its caller gets the error; the loop and every other request go on
                logger.exception("an engine command failed")
                command.fail(exc)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _abort_subscribed(self, request_id: str, sub: _Subscriber) -> None:
        if self._subscribers.get(request_id) is sub:
            del self._subscribers[request_id]  # the caller has gone: nobody reads its final output
            self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> bool:
        known = request_id in self._core.requests
        self._publish(self._core.abort(request_id))
        return known

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sub = self._subscribers.get(out.request_id)
            if sub is None:
                continue
            if out.error is not None:
                sub.put(RequestFailedError(f"request {out.request_id} failed inside the engine: {out.error}"))
            else:
                sub.put(out)
            if out.finished:
                del self._subscribers[out.request_id]

    def _check_alive(self) -> None:
        if self._dead is not None or self._stopping.is_set():
            raise EngineStoppedError("the engine is shut down; create a new Engine")


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)
