"""n samples of one prompt in one call: n streams of events merged into one.

Each sample is an ordinary generation of its own (its own request in the
core, its own seed, its own `Finished`); this module runs them side by side
and hands their events on as they come, each already marked with its index.
Where the core shares prompt prefixes (continuous batching with its prefix
cache), sample 0 goes first and the others follow once its prompt is in the
cache, so the prompt is prefilled once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from .base import EngineEvent, Finished

# Sample `index`'s events; it sets `first` (when given) once the core has its prompt's first step.
Sample = Callable[[int, asyncio.Event | None], AsyncGenerator[EngineEvent, None]]


async def merged(sample: Sample, n: int, *, staggered: bool) -> AsyncGenerator[EngineEvent, None]:
    """The events of samples 0 to n - 1, as they come, until each has finished.

    The first sample to fail fails the whole: its error is raised and the
    others are closed (their requests cancelled in the core), as they are
    when the caller closes this stream early.
    """
    queue: asyncio.Queue[EngineEvent | Exception] = asyncio.Queue()
    prefilled = asyncio.Event()

    async def run(index: int) -> None:
        try:
            if index and staggered:
                await prefilled.wait()
            async with aclosing(sample(index, prefilled if index == 0 else None)) as events:
                async for event in events:
                    queue.put_nowait(event)
        except Exception as exc:  # handed to the caller, who raises it
            queue.put_nowait(exc)
        finally:
            if index == 0:
                prefilled.set()  # sample 0 ended or failed first: the others need not wait

    tasks = [asyncio.create_task(run(index)) for index in range(n)]
    try:
        finished = 0
        while finished < n:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Finished):
                finished += 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
