"""Several async streams read as one: items in the order they arrive, every stream closed on the way
out (whatever ends the reading: the end, an error, the reader leaving)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def merge(streams: list[AsyncIterator[T]]) -> AsyncGenerator[T, None]:
    """The items of every stream, interleaved as they come; the first error of any stream is raised
    (after the others are cancelled). One stream is read directly, without a task."""
    if len(streams) == 1:
        stream = streams[0]
        try:
            async for item in stream:
                yield item
        finally:
            await _close(stream)
        return
    queue: asyncio.Queue[tuple[bool, T | Exception | None]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((True, item))
        except Exception as exc:
            queue.put_nowait((False, exc))
            return
        queue.put_nowait((False, None))

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            is_item, item = await queue.get()
            if is_item:
                yield item  # type: ignore[misc]
            elif item is None:
                running -= 1
            else:
                assert isinstance(item, Exception)
                raise item
    finally:  # cancelling a pump ends its stream; closing it then is for a pump that never started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await _close(stream)


async def _close(stream: AsyncIterator[T]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
