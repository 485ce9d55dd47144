"""What both clients do around each call: its deadline, its span, its failure as an LLMError."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from . import _transport as t
from ._connection import Connection
from ._errors import DeadlineExceededError, LLMError, from_rpc_error
from ._gen.entity.grpc import GenerateResponse
from ._tracing import Traced, outcome
from ._types import Chunk

Metadata = Sequence[tuple[str, str]]

log = logging.getLogger(__name__)

# gRPC ends a call at its deadline. A call it has not ended OVERDUE seconds
# later (a channel whose interceptor dropped the deadline, or a fault in the
# transport: a sync stream once sat in grpcio 300 s past its 10 s deadline
# after every balanced replica was killed) is cancelled by the client, which
# raises DeadlineExceededError: a timeout is a promise to the caller.
OVERDUE = 1.0

# gRPC's deadlines overflow a little past 9e9 s (and at infinity): such a call
# fails at once with DEADLINE_EXCEEDED. A timeout this long means none.
FOREVER = 1e9


def deadline(default: float | None, timeout: float | None) -> float | None:
    """A call's own timeout wins over the client's default, even when it is 0; an infinite
    one (or one of FOREVER seconds or more, over 31 years) is no deadline.

    Raises:
        ValueError: a timeout that is not a number (NaN).
    """
    chosen = default if timeout is None else timeout
    if chosen is None:
        return None
    if math.isnan(chosen):
        raise ValueError("timeout must be a number of seconds or None, got nan")
    return None if chosen >= FOREVER else chosen


class Alarm:
    """A call's backstop: it cancels the call if the call is still going
    OVERDUE seconds after its deadline (never, without a deadline). An aio
    call's alarm rings on the running event loop; a sync call's on the
    process's deadline thread.

    `rang` is set (before the cancel) when it rang while the call was going:
    a cancellation the call then ends with is the alarm's.
    """

    __slots__ = ("_cancel", "_handle", "_watched", "ended", "rang")

    def __init__(self, timeout: float | None, cancel: Callable[[], object], *, aio: bool = False) -> None:
        self._cancel = cancel
        self._handle: asyncio.TimerHandle | None = None
        self._watched = False
        self.ended = timeout is None
        self.rang = False
        if timeout is None:
            return
        if aio:
            self._handle = asyncio.get_running_loop().call_later(max(timeout, 0) + OVERDUE, self.ring)
        else:
            self._watched = True
            _WATCH.add(self, max(timeout, 0) + OVERDUE)

    def ring(self) -> None:
        if not self.ended:
            self.rang = True
            self._cancel()

    def overdue(self) -> bool:
        """For an aio call that raised CancelledError: the alarm's cancel, not its task's."""
        task = asyncio.current_task()
        return self.rang and not (task is not None and task.cancelling())

    def end(self) -> None:
        """The call is over: the alarm never rings. Takes no lock: it also runs when the garbage
        collector closes an abandoned stream, which may happen while this thread holds one."""
        if self.ended:
            return
        self.ended = True
        self._cancel = _nothing  # the ended call is not kept alive until its alarm's time
        if self._handle is not None:
            self._handle.cancel()
        elif self._watched:
            _WATCH.ended += 1


def _nothing() -> None:
    pass


class _Watch:
    """The alarms of this process's sync calls, rung by one daemon thread (started with the first)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has no such thread

    def _reset(self) -> None:
        self._due: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._changed = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        # Alarms ended since the last count (approximately: Alarm.end() adds to it without the lock).
        self.ended = 0

    def add(self, alarm: Alarm, seconds: float) -> None:
        with self._changed:
            if self.ended > 64 and self.ended * 2 > len(self._due):  # most are over: drop them now
                self._due = [entry for entry in self._due if not entry[2].ended]
                heapq.heapify(self._due)
                self.ended = 0
            heapq.heappush(self._due, (time.monotonic() + seconds, next(self._order), alarm))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="entity-llm-deadlines", daemon=True)
                self._thread.start()
            if self._due[0][2] is alarm:
                self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    while self._due and self._due[0][2].ended:
                        heapq.heappop(self._due)
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    if wait is not None and wait <= 0:
                        alarm = heapq.heappop(self._due)[2]
                        break
                    self._changed.wait(None if wait is None else min(wait, threading.TIMEOUT_MAX))
            try:
                alarm.ring()  # outside the lock: cancelling a call runs gRPC's callbacks
            except Exception:  # a channel's own cancel() (an interceptor's) must not end the thread
                log.exception("cancelling a call past its deadline failed")


_WATCH = _Watch()


class Call:
    """One call's span (its context in `metadata`), and its failure translated.

    A stream's responses pass through `chunk()`, which keeps what the span
    ends with: the request id and each sample's last chunk.
    """

    __slots__ = ("_balanced", "_finals", "_request_id", "_traced", "failure", "metadata")

    def __init__(self, method: str, connection: Connection) -> None:
        self._traced = Traced(method, connection.target)
        self._balanced = connection.balanced
        self.metadata = self._traced.metadata
        self.failure: LLMError | None = None
        self._request_id = ""  # the server sends it on the first message, and each sample's last
        self._finals: list[Chunk] = []

    def chunk(self, response: GenerateResponse) -> Chunk:
        """The stream's next chunk."""
        self._request_id = self._request_id or response.request_id
        chunk = t.to_chunk(response, self._request_id)
        if chunk.finish_reason is not None:
            self._finals.append(chunk)
        return chunk

    def failed(self, error: grpc.RpcError) -> LLMError:
        """The call's failure: the LLMError subclass for its status, which `end()` records."""
        self.failure = from_rpc_error(error, balanced=self._balanced)
        return self.failure

    def overdue(self, timeout: float | None) -> LLMError:
        """The failure of a call the client cancelled past its deadline (its Alarm rang, so it had one)."""
        self.failure = DeadlineExceededError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the call was still going {OVERDUE:g} s past its {timeout or 0:g} s deadline: the client cancelled it",
        )
        return self.failure

    def end(self) -> None:
        """End the span, with the failure (if any) and what the stream said of its samples."""
        self._traced.end(self.failure, **outcome(self._request_id, self._finals))
