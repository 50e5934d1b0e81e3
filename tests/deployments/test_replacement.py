"""Placing a request again when its replica dies before the first token (the ingress's retry rule).

The streams here stand in for replica streams: one raises Ray's own `RayActorError` on its first item,
as a stream from a killed replica does; another yields the retryable `StreamError` that a replica whose
engine loop died answers with. (The live kill tests are in test_faults.py and test_health.py; which
requests wait on the victim there depends on timing, so this rule is pinned here.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray.exceptions

from deployments.ingress import first_item, next_item
from deployments.openai_api import ApiError
from deployments.protocol import StreamError, StreamItem


def _item(text: str) -> StreamItem:
    return StreamItem(text, (1,), 1, 3, False, None, 0.01, "replica-a")


class _Stream:
    """A replica stream: its items, or an error raised on the first one."""

    def __init__(self, items: list[StreamItem | StreamError], fail: BaseException | None = None) -> None:
        self._items = iter(items)
        self._fail = fail

    def __aiter__(self) -> AsyncIterator[StreamItem | StreamError]:
        return self

    async def __anext__(self) -> StreamItem | StreamError:
        if self._fail is not None:
            raise self._fail
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None


def _starts(*streams: _Stream) -> tuple[list[int], Any]:
    placed: list[int] = []

    async def start() -> _Stream:
        placed.append(len(placed))
        return streams[len(placed) - 1]

    return placed, start


def test_a_dead_replica_before_the_first_token_means_another_placement() -> None:
    dead = _Stream([], fail=ray.exceptions.RayActorError())
    alive = _Stream([_item("a"), _item("b")])
    placed, start = _starts(dead, alive)
    first, stream = asyncio.run(first_item(3, start))
    assert first == _item("a") and stream is alive and len(placed) == 2


def test_a_replica_whose_engine_stopped_before_the_first_token_means_another_placement() -> None:
    stopped = _Stream([StreamError(503, "the engine loop died", retryable=True)])
    alive = _Stream([_item("a")])
    placed, start = _starts(stopped, alive)
    first, stream = asyncio.run(first_item(3, start))
    assert first == _item("a") and stream is alive and len(placed) == 2


def test_a_refused_request_is_not_placed_again() -> None:
    refused = StreamError(400, "max_tokens is too large", "max_tokens")
    placed, start = _starts(_Stream([refused]), _Stream([_item("never")]))
    first, _ = asyncio.run(first_item(3, start))
    assert first == refused and len(placed) == 1


@pytest.mark.parametrize(
    "stream",
    [
        _Stream([StreamError(503, "the engine loop died", retryable=True)]),
        _Stream([], fail=ray.exceptions.RayActorError()),
        _Stream([]),
    ],
    ids=["engine stopped", "replica died", "stream cut short"],
)
def test_a_failure_mid_request_ends_it_with_replica_failed(stream: _Stream) -> None:
    with pytest.raises(ApiError) as caught:
        asyncio.run(next_item(stream))
    assert caught.value.status == 503 and caught.value.code == "replica_failed"


def test_placements_are_bounded_and_end_in_a_503() -> None:
    placed, start = _starts(*[_Stream([], fail=ray.exceptions.RayActorError()) for _ in range(3)])
    with pytest.raises(ApiError) as caught:
        asyncio.run(first_item(3, start))
    assert caught.value.status == 503 and "RayActorError" in caught.value.message and len(placed) == 3


def test_other_failures_are_not_retried() -> None:
    placed, start = _starts(_Stream([]), _Stream([_item("never")]))
    with pytest.raises(ApiError) as caught:  # a stream that ends without output is a bug, not a dead replica
        asyncio.run(first_item(3, start))
    assert caught.value.status == 500 and len(placed) == 1


def _task_error(cause: Exception) -> ray.exceptions.RayTaskError:
    """What Ray raises in the caller when the called method raised `cause`: a RayTaskError that is also an
    instance of the cause's class (`as_instanceof_cause`), which is a RayError like a dead replica's."""
    return ray.exceptions.RayTaskError("EngineReplica.generate", "Traceback: ...", cause).as_instanceof_cause()


def test_an_exception_raised_by_the_call_on_a_live_replica_is_a_500_and_not_placed_again() -> None:
    raised = _task_error(TypeError("TextEncodeInput must be Union[...]"))
    assert isinstance(raised, ray.exceptions.RayError)  # what the old ingress took for a dead replica
    placed, start = _starts(_Stream([], fail=raised), _Stream([_item("never")]))
    with pytest.raises(ApiError) as caught:
        asyncio.run(first_item(3, start))
    assert (caught.value.status, caught.value.code) == (500, "internal_error") and len(placed) == 1
    assert "TypeError" in caught.value.message
    with pytest.raises(ApiError) as mid:
        asyncio.run(next_item(_Stream([], fail=_task_error(ValueError("bad")))))
    assert (mid.value.status, mid.value.code) == (500, "internal_error")
