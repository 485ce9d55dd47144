"""The batching engine in a process of its own, behind a pipe.

In one process, the gRPC event loop and transformers' batching thread share
one GIL: every token's detokenization, stop matching, protobuf and gRPC write
waits for the batching loop's Python scheduling between torch calls, and the
other way round (profiled at 32 streams: the batching thread busy about 78% of
the time, the event loop 14%, hardly ever at once). Here the model runs in a
child process (`engine.worker`, `python -m entity_llm_server.engine.worker FD PID`) and the gRPC
process keeps only the tokenizer, so the two loops run in parallel.

What crosses the pipe (pickled tuples over a `multiprocessing` connection):

- front end to engine: ``("add", rid, ids, max_new_tokens, sampling)``,
  ``("cancel", rid)``, ``("state", token)``, ``("ping", token)``, ``("stop",)``;
- engine to front end: ``("ready", facts)`` or ``("failed", message)`` once,
  then ``("step", [(rid, new_ids, logprobs, finished, error), ...], active)``
  per batch of results (one per decode step, every sequence's new tokens in
  one message), ``("state", token, CoreState)``, ``("pong", token)``, and
  ``("dead", reason)`` when the batching thread dies.

Requests are validated, admitted and cancelled in the front end exactly as in
`BatchingEngine` (this class is one); the engine process only runs the
manager. It ignores SIGINT and SIGTERM, because a drain must let it finish
the streams in flight, and it exits when its pipe closes: after `close()`, or
when the front end dies in any way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

from .base import CoreState, EngineError, EngineRequest, EngineUnavailableError
from .batching import _DEAD, BatchingEngine, BatchingSettings
from .child import EngineProcess, ModelFacts
from .tokens import Prepared, Step

log = logging.getLogger(__name__)

# The front end pings the engine process every LIVENESS_INTERVAL seconds; one
# that has not answered for LIVENESS_TIMEOUT (stopped, or its interpreter
# wedged) is unhealthy until it answers again.
LIVENESS_INTERVAL = 1.0
LIVENESS_TIMEOUT = 10.0


def _send_all(conn: Any, outbox: queue.SimpleQueue[tuple[Any, ...] | None], failure: list[BaseException]) -> None:
    """The front end's sender thread: `outbox` to the engine process, in order, until None or a dead pipe.

    It holds no reference to the engine object, so an engine nobody closes
    can still be collected (and its process killed by the finalizer).
    """
    while (message := outbox.get()) is not None:
        try:
            conn.send(message)
        except (OSError, ValueError) as exc:  # closed: the engine process is gone; its EOF reports that
            failure.append(exc)
            return


class ProcessEngine(BatchingEngine):
    """`BatchingEngine` whose model and batching thread run in an `EngineProcess`.

    Built by `UnifiedLLMResource` with `engine_process=True` (the console
    script's default). Tokenization, detokenization, stop sequences,
    admission and cancellation stay here; token ids and logprobs come back
    over the pipe, one message per decode step.
    """

    def __init__(
        self,
        child: EngineProcess,
        facts: ModelFacts,
        tokenizer: Any,
        *,
        settings: BatchingSettings,
        default_max_new_tokens: int = 128,
    ) -> None:
        super().__init__(facts, tokenizer, settings=settings, default_max_new_tokens=default_max_new_tokens)
        self.child = child
        self._conn = child.conn
        # Messages to the engine process go out from a thread of their own: a
        # send blocks once the pipe is full (an engine process that reads
        # nothing, a prompt of megabytes), and must never block the event loop.
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._send_failure: list[BaseException] = []
        threading.Thread(
            target=_send_all,
            args=(self._conn, self._outbox, self._send_failure),
            name="entity-llm-engine-send",
            daemon=True,
        ).start()
        self._started = False
        self._closed = False
        self._active = 0
        self._state_replies: dict[int, CoreState] = {}
        self._state_events: dict[int, threading.Event] = {}
        self.liveness_interval = LIVENESS_INTERVAL
        self.liveness_timeout = LIVENESS_TIMEOUT
        self._ping_sent: float | None = None  # when the ping not yet answered went out
        self._liveness: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self._started and self._failure is None and self.child.alive and self.responsive

    @property
    def responsive(self) -> bool:
        """False while a liveness ping has gone unanswered for `liveness_timeout` seconds."""
        sent = self._ping_sent
        return sent is None or time.monotonic() - sent < self.liveness_timeout

    @property
    def stalled(self) -> bool:
        """Alive and not failed, but not answering: unhealthy, yet it may recover."""
        return self._failure is None and self.child.alive and not self.responsive

    async def _ping(self) -> None:
        warned = False
        while self._started and self._failure is None:
            if self._ping_sent is None:
                if warned:
                    log.warning("the engine process answers again")
                    warned = False
                self._ping_sent = time.monotonic()
                try:
                    self._send(("ping", next(self._ids)))
                except EngineError:
                    return  # gone: its pipe's EOF reports the death
            elif not warned and not self.responsive:
                log.warning("the engine process has not answered for %g s (stopped, or stuck)", self.liveness_timeout)
                warned = True
            await asyncio.sleep(self.liveness_interval)

    async def start(self) -> None:
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        # Results are read on the event loop itself when the pipe is readable:
        # no thread of ours competes for this process's GIL.
        self._loop.add_reader(self._conn.fileno(), self._readable)
        self._started = True
        self._liveness = self._loop.create_task(self._ping(), name="entity-llm-engine-ping")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._liveness is not None:
            self._liveness.cancel()
        running = self._started and self._loop is not None
        if running:
            assert self._loop is not None
            self._started = False
            self._loop.remove_reader(self._conn.fileno())
        if running and self.responsive:
            with contextlib.suppress(EngineError):
                self._send(("stop",))
            await asyncio.to_thread(self.child.stop)
        else:  # never started, or not answering: nothing runs there worth waiting for
            await asyncio.to_thread(self.child.kill)
        self._outbox.put(None)  # the sender thread ends
        self._fail_waiting()

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._send_failure:  # a closed pipe: the engine process is gone
            raise EngineError(f"engine has failed: the engine process is gone ({self._send_failure[0]!r})")
        self._outbox.put(message)

    # -- results (on the event loop) ------------------------------------------

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                message = self._conn.recv()
                kind = message[0]
                if kind == "step":
                    self._active = message[2]
                    for rid, ids, logprobs, finished, error in message[1]:
                        pending = self._queues.get(rid)
                        if pending is not None:  # None: the request was cancelled; drop its stragglers
                            pending.put_nowait((ids, logprobs, finished, error))
                elif kind == "pong":
                    self._ping_sent = None
                elif kind == "state":
                    self._state_replies[message[1]] = message[2]
                    if (event := self._state_events.get(message[1])) is not None:
                        event.set()
                elif kind == "dead":
                    self._on_death(message[1])
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(self._conn.fileno())
            if self._failure is None and self._started:
                # Its pipe closes as it exits: the status is there now or in a moment.
                self._on_death(f"the engine process {self.child.exit_status(wait=0.2)}")
        except Exception as exc:  # an unreadable message: the pipe's framing can no longer be trusted
            assert self._loop is not None
            self._loop.remove_reader(self._conn.fileno())
            self._on_death(f"unreadable message from the engine process: {type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError):
                self.child.popen.kill()

    # -- requests -------------------------------------------------------------

    @property
    def _accepting(self) -> bool:
        return self._started

    def _admit(self) -> None:
        super()._admit()
        if not self.responsive:  # its pipe may be full: add nothing more
            raise EngineUnavailableError(
                f"the engine process has not answered for {self.liveness_timeout:g} s; try again later"
            )

    async def _token_ids(self, prepared: Prepared, request: EngineRequest) -> AsyncGenerator[Step, None]:
        rid = f"req-{next(self._ids)}"
        pending: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[rid] = pending
        done = False
        try:
            if self._failure is not None:  # it failed after _admit(), before this queue existed
                raise EngineError(f"engine has failed: {self._failure}")
            self._send(("add", rid, prepared.ids, prepared.max_new_tokens, prepared.sampling))
            while not done:
                item = await pending.get()
                if item is _DEAD:
                    raise EngineError(f"engine has failed: {self._failure or 'stopped'}")
                ids, logprobs, done, error = item
                # A stream that fell behind takes every step waiting as one.
                while not done and error is None and not pending.empty():
                    item = pending.get_nowait()
                    if item is _DEAD:
                        raise EngineError(f"engine has failed: {self._failure or 'stopped'}")
                    ids = ids + item[0]
                    logprobs = None if logprobs is None else logprobs + item[1]
                    done, error = item[2], item[3]
                if error is not None:
                    done = True  # the engine process has already dropped it
                    raise EngineError(error)
                if ids:
                    yield ids, logprobs
        finally:
            del self._queues[rid]
            if not done and self._failure is None:
                with contextlib.suppress(EngineError):
                    self._send(("cancel", rid))

    def _fail_waiting(self) -> None:
        super()._fail_waiting()
        for event in list(self._state_events.values()):  # core_state() answers at once
            event.set()

    def core_state(self) -> CoreState:
        """The engine process's own count of the requests it holds and of its
        decode steps; call it from a thread other than the event loop."""
        if not self.healthy:
            return CoreState(0, 0)
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread, as it must be
            here = None
        if here is not None and here is self._loop:
            raise RuntimeError("core_state() waits for the event loop: call it from another thread")
        token = next(self._ids)
        event = self._state_events[token] = threading.Event()
        try:
            self._send(("state", token))
            if not event.wait(30):
                raise EngineError("the engine process did not answer")
            # None: woken by the engine's death, which dropped every request
            return self._state_replies.get(token) or CoreState(0, 0)
        finally:
            del self._state_events[token]
            self._state_replies.pop(token, None)

    def load(self) -> tuple[int, int]:
        held = self.in_flight
        active = min(self._active, held, self.settings.max_batch_size)
        return (active, held - active)
