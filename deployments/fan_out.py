"""Several streams read as one: how an engine replica runs the choices of one call side by side."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True)
class _Ended:
    error: Exception | None = None


@dataclass(frozen=True)
class _Next(Generic[Item]):
    item: Item


async def merged(streams: Sequence[AsyncIterator[Item]]) -> AsyncIterator[tuple[int, Item]]:
    """Each stream's items as they come, with the stream's index; ends when every stream has ended.

    Nothing is yielded until every stream has yielded its first item or ended: a stream that fails first
    (a prompt the engine refuses) fails the whole call before any output has gone out, as one request would.
    A failure raises here and closes the other streams; so does closing this iterator (the caller left).
    """
    if len(streams) == 1:  # the common case needs no tasks
        async with contextlib.aclosing(_single(streams[0])) as one:
            async for item in one:
                yield 0, item
        return
    # Closed early, this iterator closes the inner one at once (which closes the streams), not at collection.
    async with contextlib.aclosing(_several(streams)) as several:
        async for index, item in several:
            yield index, item


async def _single(stream: AsyncIterator[Item]) -> AsyncGenerator[Item, None]:
    try:
        async for item in stream:
            yield item
    finally:
        # Closed early, this iterator closes the stream at once rather than whenever it is collected.
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


async def _several(streams: Sequence[AsyncIterator[Item]]) -> AsyncGenerator[tuple[int, Item], None]:
    queue: asyncio.Queue[tuple[int, _Next[Item] | _Ended]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Item]) -> None:
        try:
            async for item in stream:
                await queue.put((index, _Next(item)))
        except Exception as exc:  # handed to the reader, who raises it
            await queue.put((index, _Ended(exc)))
        else:
            await queue.put((index, _Ended()))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    held: list[tuple[int, Item]] | None = []  # items that came before every stream started; None after
    started: set[int] = set()
    running = len(streams)
    try:
        while running:
            index, got = await queue.get()
            started.add(index)
            if isinstance(got, _Ended):
                if got.error is not None:
                    raise got.error
                running -= 1
            elif held is not None:
                held.append((index, got.item))
            else:
                yield index, got.item
            if held is not None and len(started) == len(streams):
                for early in held:
                    yield early
                held = None
    finally:
        for task in tasks:
            task.cancel()  # closes each stream still open (the engine aborts its request)
        await asyncio.gather(*tasks, return_exceptions=True)
