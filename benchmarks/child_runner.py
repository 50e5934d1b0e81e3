"""`ChildRunner`: the engine in a child process, its outputs streamed back over a pipe.

In process, the client's event loop (its send timers, its stream handling) and the engine's step loop share
one interpreter and its GIL: a token can wait for the client, and an arrival for the engine's Python. Here
the engine runs alone in a spawned process with its own event loop; the parent sends each request as a
`RequestSpec` and receives one small message per output, timestamped on receipt as any client would.
The child loads its own model (a few seconds per runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from benchmarks.engine_runner import policy_label, stream_engine, stream_event
from benchmarks.metrics import EngineCounts
from benchmarks.runners import BenchmarkError, Runner, StreamEvent
from benchmarks.workload import RequestSpec

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from qllm_core import Engine, EngineConfig

_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _Generate:
    rid: int
    spec: RequestSpec


@dataclass(frozen=True)
class _Abort:
    rid: int


@dataclass(frozen=True)
class _CountsQuery:
    rid: int


@dataclass(frozen=True)
class _Stop:
    pass


@dataclass(frozen=True)
class _Ready:
    error: str | None


@dataclass(frozen=True)
class _Update:
    rid: int
    event: StreamEvent
    finished: bool


@dataclass(frozen=True)
class _Failed:
    rid: int
    error: str


@dataclass(frozen=True)
class _Counts:
    rid: int
    counts: EngineCounts


_Reply = _Update | _Failed | _Counts
_FromChild = _Ready | _Reply


class ChildRunner(Runner):
    """Runs a `qllm_core.Engine` in a spawned child process; started on `start`, stopped on `close`."""

    def __init__(self, config: EngineConfig, label: str | None = None) -> None:
        self.config = config
        self.label = label if label is not None else policy_label(config)
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._queues: dict[int, asyncio.Queue[_Reply | BaseException]] = {}
        self._ids = itertools.count()

    async def start(self) -> None:
        if self._proc is not None:
            return
        ctx = multiprocessing.get_context("spawn")  # a fork would copy the parent's threads and torch state
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=serve_engine, args=(self.config, child_conn), name="qllm-bench-engine", daemon=True)
        proc.start()
        child_conn.close()
        self._proc, self._conn = proc, conn
        try:
            ready = await asyncio.to_thread(conn.recv)
        except EOFError:
            await self.close()
            raise BenchmarkError(f"{self.label}: the engine process exited while starting") from None
        if not isinstance(ready, _Ready) or ready.error is not None:
            await self.close()
            raise BenchmarkError(f"{self.label}: the engine process failed to start: {getattr(ready, 'error', ready)}")
        asyncio.get_running_loop().add_reader(conn.fileno(), self._receive)

    def _receive(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while conn.poll():
                msg: _FromChild = conn.recv()
                if isinstance(msg, _Reply) and (queue := self._queues.get(msg.rid)) is not None:
                    queue.put_nowait(msg)
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            for queue in self._queues.values():
                queue.put_nowait(BenchmarkError(f"{self.label}: the engine process died"))

    async def close(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(conn.fileno())
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(_Stop())
        if proc is not None:
            await asyncio.to_thread(proc.join, _STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, _STOP_TIMEOUT_S)
        if conn is not None:
            conn.close()

    def _open(self) -> tuple[Connection, int, asyncio.Queue[_Reply | BaseException]]:
        """A new request id on the running child, and the queue its replies come on."""
        if self._conn is None:
            raise BenchmarkError("the runner is not started; use `async with runner:`")
        rid = next(self._ids)
        queue: asyncio.Queue[_Reply | BaseException] = asyncio.Queue()
        self._queues[rid] = queue
        return self._conn, rid, queue

    @staticmethod
    async def _reply(queue: asyncio.Queue[_Reply | BaseException]) -> _Update | _Counts:
        msg = await queue.get()
        if isinstance(msg, BaseException):
            raise msg
        if isinstance(msg, _Failed):
            raise BenchmarkError(msg.error)
        return msg

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        """Stream one request through the child's engine."""
        conn, rid, queue = self._open()
        finished = False
        try:
            conn.send(_Generate(rid, spec))
            while not finished:
                msg = await self._reply(queue)
                assert isinstance(msg, _Update)
                finished = msg.finished
                yield msg.event
        finally:
            del self._queues[rid]
            if not finished and self._conn is not None:
                with contextlib.suppress(OSError, BrokenPipeError):
                    self._conn.send(_Abort(rid))

    async def engine_counts(self) -> EngineCounts:
        """The child engine's totals of passes, preemptions and merges now."""
        conn, rid, queue = self._open()
        try:
            conn.send(_CountsQuery(rid))
            msg = await self._reply(queue)
        finally:
            del self._queues[rid]
        assert isinstance(msg, _Counts)
        return msg.counts


def serve_engine(config: EngineConfig, conn: Connection) -> None:
    """The child's main: build the engine, then serve requests from the pipe until told to stop."""
    asyncio.run(_serve(config, conn))


async def _serve(config: EngineConfig, conn: Connection) -> None:
    try:
        from qllm_core import Engine

        engine = Engine(config)
    except Exception as exc:  # told to the parent, which raises it as a BenchmarkError
        conn.send(_Ready(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(_Ready(None))
    await _ChildLoop(engine, conn).serve()


class _ChildLoop:
    """The child's side of the pipe: one task per request, answers to count queries, until told to stop."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self.stop = asyncio.Event()
        self.tasks: dict[int, asyncio.Task[None]] = {}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._receive)
        try:
            await self.stop.wait()
        finally:
            loop.remove_reader(self.conn.fileno())
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            self.engine.shutdown()
            self.conn.close()

    async def _one(self, rid: int, spec: RequestSpec) -> None:
        try:
            async for out in stream_engine(self.engine, spec):
                self.conn.send(_Update(rid, stream_event(out), out.finished))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one request's failure is data for the parent
            self.conn.send(_Failed(rid, f"{type(exc).__name__}: {exc}"))
        finally:
            self.tasks.pop(rid, None)

    def _receive(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):  # the parent went away
            self.stop.set()

    def _handle(self, msg: object) -> None:
        if isinstance(msg, _Generate):
            self.tasks[msg.rid] = asyncio.get_running_loop().create_task(self._one(msg.rid, msg.spec))
        elif isinstance(msg, _Abort) and (task := self.tasks.get(msg.rid)) is not None:
            task.cancel()  # closing the output stream aborts the request in the engine
        elif isinstance(msg, _CountsQuery):
            self.conn.send(_Counts(msg.rid, EngineCounts.of(self.engine.stats())))
        elif isinstance(msg, _Stop):
            self.stop.set()
