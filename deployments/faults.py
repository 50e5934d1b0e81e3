"""Fault injection into an engine replica's engine, for the fault tests: the loop killed, one step raising,
the loop stalled. Reached only through `EngineReplica`'s hooks, which refuse unless the replica's
environment has $QLLM_FAULT_INJECTION=1; no HTTP route leads here.

Each fault is queued as a command of the engine's loop thread, so that it happens there, between steps,
as a bug in the loop would (the engine has no public fault hook; this module is the one place that reaches
into its command queue and core). Importing it loads no torch: the PriorityRouter has a hook here too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the router imports this module too, and must not load torch
    from qllm_core import Engine

logger = logging.getLogger("ray.serve")

FAULT_INJECTION_ENV = "QLLM_FAULT_INJECTION"
"""Set to 1 in an engine replica's environment to enable its fault hooks (fault-injection tests)."""


class LoopKilled(BaseException):
    """Raised in the loop thread: a BaseException, which the loop's guard around a command does not catch."""


def _log(exc: BaseException) -> None:
    logger.error("a fault-injection command failed: %s", exc)


def _queue(engine: Engine, run: Callable[[], object]) -> None:
    """Run `run` on the engine's loop thread, between steps."""
    from qllm_core.engine import Command  # noqa: PLC0415 - loads torch: not at import (the router)

    engine._commands.put(Command(run, _log))


def hang_event_loop(seconds: float) -> None:
    """Block the calling thread, on purpose from a coroutine: its event loop answers nothing meanwhile."""
    time.sleep(seconds)


def require_enabled() -> None:
    """Refuse (PermissionError) unless fault injection is on in this process."""
    if os.environ.get(FAULT_INJECTION_ENV) != "1":
        raise PermissionError(f"fault injection is off in this replica; it needs {FAULT_INJECTION_ENV}=1")


def kill_loop(engine: Engine) -> None:
    """Make the engine loop die as a bug in it would: every request in flight fails, nothing new is taken."""

    def poison() -> None:
        raise LoopKilled("fault injection: the engine loop was killed on purpose")

    _queue(engine, poison)


def fail_next_step(engine: Engine) -> None:
    """Make the engine's next step raise, as a bug in a forward pass would: the loop fails the requests in
    flight and serves on."""
    core = engine._core

    def arm() -> None:
        def failing(*args: object, **kwargs: object) -> object:
            del core.step  # once: the next step is the core's own again
            raise RuntimeError("fault injection: this engine step raised on purpose")

        core.step = failing  # type: ignore[method-assign, assignment]

    _queue(engine, arm)


def stall_loop(engine: Engine, seconds: float) -> None:
    """Hold the loop thread for `seconds` between steps, as a hung kernel would: with work in flight, the
    replica's health check fails once the stall passes `engine_stall_timeout_s`."""
    _queue(engine, lambda: time.sleep(seconds))
