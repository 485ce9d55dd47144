"""Stalled streams (`--stalled-stream-timeout`): a Generate stream whose client stopped reading is ended.

A client that opens a stream and then does not read it fills the stream's
flow-control window; the server's next write waits, and while it waits the
stream keeps its place among the requests in flight (and its caller's fair
share) for as long as the client likes. A stream that has waited to send
for `timeout` seconds is ended: its generation is cancelled at once, which
frees its place, and the client, if it ever reads again, gets the messages
already on their way and then RESOURCE_EXHAUSTED naming the flag.

Only a wait on the client counts: a stream waiting for its next token (a
slow model, a full batch) is never cut. grpc.aio has no call to cancel a
server call, so the cut is made of its two public halves: the status is
queued with `context.abort()` (it goes out behind the data the client has
not read), and the RPC's task is cancelled, which ends the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

import grpc

log = logging.getLogger(__name__)


class Watched(Protocol):
    """What the watch reads of a stream (the interceptor's record of a call)."""

    writing: bool  # a message is being written: the stream waits on its client
    written: int  # messages written so far
    stalled: bool  # set here, when the stream is cut
    task: asyncio.Task[Any] | None
    context: Any  # the RPC's grpc.aio.ServicerContext
    request_id: str


class StalledStreams:
    """Watches the Generate streams in flight and ends those whose client has not read for `timeout` seconds.

    Args:
        timeout: seconds a stream may wait to send before it is ended (> 0).
        on_cut: called once per stream ended (a metric).
    """

    def __init__(self, timeout: float, on_cut: Any = None) -> None:
        if timeout <= 0:
            raise ValueError("the stalled-stream timeout must be positive")
        self.timeout = timeout
        self.on_cut = on_cut
        self._streams: dict[Watched, tuple[int, float]] = {}  # stream -> (written, waiting since) when seen writing
        self._aborts: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def message(self) -> str:
        return (
            f"the stream was ended: its client had not read for {self.timeout:g} s while the server had tokens "
            f"to send (--stalled-stream-timeout {self.timeout:g})"
        )

    def watch(self, stream: Watched) -> None:
        """Watch `stream` (on the server's event loop) until `forget`."""
        self._streams[stream] = (-1, 0.0)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="entity-llm-stalled-streams")

    def forget(self, stream: Watched) -> None:
        self._streams.pop(stream, None)

    async def _run(self) -> None:
        interval = min(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for stream, (written, since) in list(self._streams.items()):
                if not stream.writing:
                    continue
                if stream.written != written:  # a new wait (or the first one seen)
                    self._streams[stream] = (stream.written, now)
                elif now - since >= self.timeout:
                    self._cut(stream)

    def _cut(self, stream: Watched) -> None:
        self.forget(stream)
        task = stream.task
        if task is None or task.done():
            return
        stream.stalled = True
        log.warning(
            "ending a stream whose client has not read for %g s (--stalled-stream-timeout)",
            self.timeout,
            extra={"request_id": stream.request_id},
        )
        abort = asyncio.get_running_loop().create_task(self._abort(stream.context))
        self._aborts.add(abort)
        abort.add_done_callback(self._aborts.discard)
        # The abort queues the status first (its first step runs before the
        # handler's task sees the cancel), then the handler stops.
        asyncio.get_running_loop().call_soon(task.cancel)
        if self.on_cut is not None:
            self.on_cut()

    async def _abort(self, context: Any) -> None:
        # Done when the client reads the rest or leaves; abort() always raises.
        with contextlib.suppress(Exception):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.message)

    async def close(self) -> None:
        """Stop watching (the server stops)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for abort in list(self._aborts):
            abort.cancel()
