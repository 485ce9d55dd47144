"""The batching core in a process of its own, behind a pipe.

In one process, the gRPC event loop and transformers' batching thread share
one GIL: every token's detokenization, stop matching, protobuf and gRPC write
waits for the batching loop's Python scheduling between torch calls, and the
other way round (profiled at 32 streams: the batching thread busy about 78% of
the time, the event loop 14%, hardly ever at once). Here the model runs in an
engine process (`worker`, started by `launcher.EngineProcess`), which hands the
tokenizer to the gRPC process (no torch there), and the loops run in parallel.

`ProcessCore` is the front end's side of that process: it sends requests and
cancels as `ipc` messages, and reads each step's outputs on the event loop.
The engine process ignores SIGINT and SIGTERM, because a drain must let it
finish the streams in flight, and it exits when its pipe closes: after
`close()`, or when the front end dies in any way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from .base import DEFAULT_MAX_NEW_TOKENS, CoreState, EngineError, EngineUnavailableError
from .core import LIVENESS_TIMEOUT, CoreSink, ModelFacts
from .frontend import FrontEnd
from .inputs import Prepared
from .ipc import Add, Cancel, Dead, Message, Ping, Pong, StateQuery, StateReply, Steps, Stop, send_all
from .launcher import EngineProcess
from .ranks import PeerRanks
from .replicas import ReplicaCore
from .settings import BatchingSettings

log = logging.getLogger(__name__)

# The front end pings the engine process every LIVENESS_INTERVAL seconds; one
# that has not answered for LIVENESS_TIMEOUT (stopped, its interpreter wedged,
# or its core stuck: the worker does not answer for a stuck core) is
# unhealthy until it answers again.
LIVENESS_INTERVAL = 1.0


def _sender(conn: Connection, outbox: queue.SimpleQueue[Message | None], failure: list[Exception]) -> None:
    """The sender thread. It holds no reference to the core, so a core nobody
    closes can still be collected (and its process killed by the finalizer)."""
    if (exc := send_all(conn, outbox)) is not None:  # closed: the engine process is gone; its EOF says how
        failure.append(exc)


class ProcessCore:
    """The front end's handle on a batching core in an `EngineProcess`.

    Args:
        child: the started engine process (its model loaded: `wait_ready()` answered).
        facts: the model's facts, as the engine process reported them.
        settings: how its batching is sized.
        peers: under tensor parallelism, the group's other ranks (1, 2, ...),
            started with `child` as rank 0. The core is then healthy only
            while every rank runs and answers: one that dies, or does not
            answer for `liveness_timeout`, fails the core and the group is
            killed (its ranks would wait for the lost one in gloo or NCCL).
    """

    def __init__(
        self,
        child: EngineProcess,
        facts: ModelFacts,
        settings: BatchingSettings,
        peers: Sequence[EngineProcess] = (),
    ) -> None:
        self.child = child
        self.facts = facts
        self.settings = settings
        self.peers = PeerRanks(peers, self._peer_lost)
        self._conn = child.conn
        # Messages to the engine process go out from a thread of their own: a
        # send blocks once the pipe is full (an engine process that reads
        # nothing, a prompt of megabytes), and must never block the event loop.
        self._outbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._send_failure: list[Exception] = []
        threading.Thread(
            target=_sender,
            args=(self._conn, self._outbox, self._send_failure),
            name="entity-llm-engine-send",
            daemon=True,
        ).start()
        self._sink: CoreSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False
        self._failure: str | None = None
        self._active = 0
        self._tokens = itertools.count()
        self._state_replies: dict[int, CoreState] = {}
        self._state_events: dict[int, threading.Event] = {}
        self.liveness_interval = LIVENESS_INTERVAL
        self.liveness_timeout = LIVENESS_TIMEOUT
        self._ping_sent: float | None = None  # when the ping not yet answered went out
        self._liveness: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self._started and self._failure is None and self.child.alive and self.responsive and self.peers.alive

    @property
    def ranks(self) -> list[EngineProcess]:
        """Its engine processes: rank 0, then any other tensor-parallel ranks."""
        return [self.child, *self.peers.processes]

    @property
    def responsive(self) -> bool:
        """False while a liveness ping has gone unanswered for `liveness_timeout` seconds."""
        sent = self._ping_sent
        return sent is None or time.monotonic() - sent < self.liveness_timeout

    @property
    def stalled(self) -> bool:
        """Alive and not failed, but not answering: unhealthy, yet it may recover."""
        return self._failure is None and self.child.alive and not self.responsive

    @property
    def active(self) -> int:
        return self._active

    def check_admission(self) -> None:
        if not self.responsive:  # its pipe may be full: add nothing more
            raise EngineUnavailableError(
                f"the engine process has not answered for {self.liveness_timeout:g} s; try again later"
            )

    # -- lifecycle ------------------------------------------------------------

    async def _ping(self) -> None:
        warned = False
        while self._started and self._failure is None:
            if self._ping_sent is None:
                if warned:
                    log.warning("the engine process answers again")
                    warned = False
                self._ping_sent = time.monotonic()
                try:
                    self._send(Ping(next(self._tokens)))
                except EngineError:
                    return  # gone: its pipe's EOF reports the death
            elif not self.responsive and self.peers:
                # One rank that does not answer holds up the whole group.
                self._died(f"tensor-parallel rank 0 has not answered for {self.liveness_timeout:g} s")
                return
            elif not warned and not self.responsive:
                log.warning("the engine process has not answered for %g s (stopped, or stuck)", self.liveness_timeout)
                warned = True
            if not self.peers.ping(time.monotonic(), self._tokens, self.liveness_timeout):
                return
            await asyncio.sleep(self.liveness_interval)

    async def start(self, sink: CoreSink) -> None:
        if self._started:
            return
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        # Results are read on the event loop itself when the pipe is readable:
        # no thread of ours competes for this process's GIL.
        self._loop.add_reader(self._conn.fileno(), self._readable)
        self.peers.start(self._loop)
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
            self.peers.stop_reading()
        if running and self.responsive:
            with contextlib.suppress(EngineError):
                self._send(Stop())
            self.peers.stop()
            await asyncio.gather(*(asyncio.to_thread(rank.stop) for rank in self.ranks))
        else:  # never started, or not answering: nothing runs there worth waiting for
            await asyncio.gather(*(asyncio.to_thread(rank.kill) for rank in self.ranks))
        self._outbox.put(None)  # the sender thread ends
        self._wake_state_readers()

    def _send(self, message: Message) -> None:
        if self._send_failure:  # a closed pipe: the engine process is gone
            raise EngineError(f"engine has failed: the engine process is gone ({self._send_failure[0]!r})")
        self._outbox.put(message)

    # -- what the engine process says (on the event loop) ------------------------

    def _readable(self) -> None:
        assert self._loop is not None
        try:
            while self._conn.poll():
                match self._conn.recv():
                    case Steps(outputs, active):
                        self._active = active
                        if self._sink is not None:
                            self._sink.deliver(outputs)
                    case Pong():
                        self._ping_sent = None
                    case StateReply(token, state):
                        self._state_replies[token] = state
                        if (event := self._state_events.get(token)) is not None:
                            event.set()
                    case Dead(reason):
                        self._died(reason)
                    case other:
                        raise TypeError(f"{type(other).__name__} is no message the engine process sends now")
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            if self._failure is None and self._started:
                # Its pipe closes as it exits: the status is there now or in a moment.
                self._died(f"the engine process {self.child.exit_status(wait=0.2)}")
        except Exception as exc:  # an unreadable message: the pipe's framing can no longer be trusted
            self._loop.remove_reader(self._conn.fileno())
            self._died(f"unreadable message from the engine process: {type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError):
                self.child.popen.kill()

    def _peer_lost(self, reason: str) -> None:
        if self._failure is None and self._started:
            self._died(reason)

    def _died(self, reason: str) -> None:
        if self._failure is not None:
            return
        self._failure = reason
        if self.peers:
            # The ranks left would wait for the lost one inside a collective:
            # nothing they hold can be served, and their memory is wanted.
            for rank in self.ranks:
                with contextlib.suppress(OSError):
                    rank.popen.kill()
        if self._sink is not None:
            self._sink.core_failed(reason)
        self._wake_state_readers()

    def _wake_state_readers(self) -> None:
        for event in list(self._state_events.values()):  # state() answers at once
            event.set()

    # -- requests -------------------------------------------------------------

    def add(self, rid: str, prepared: Prepared) -> None:
        if self._failure is not None:
            raise EngineError(f"engine has failed: {self._failure}")
        self._send(Add(rid, tuple(prepared.ids), prepared.max_new_tokens, prepared.sampling))

    def cancel(self, rid: str) -> None:
        if self._failure is None:
            self._send(Cancel(rid))

    def state(self) -> CoreState:
        """The engine process's own count of the requests it holds and of its
        decode steps; call it from a thread other than the event loop."""
        if not self.healthy:
            return CoreState(0, 0)
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread, as it must be
            here = None
        if here is not None and here is self._loop:
            raise RuntimeError("state() waits for the event loop: call it from another thread")
        token = next(self._tokens)
        event = self._state_events[token] = threading.Event()
        try:
            self._send(StateQuery(token))
            if not event.wait(30):
                raise EngineError("the engine process did not answer")
            # None: woken by the engine's death, which dropped every request
            return self._state_replies.get(token) or CoreState(0, 0)
        finally:
            del self._state_events[token]
            self._state_replies.pop(token, None)


class ProcessEngine(FrontEnd):
    """The front end over batching cores in engine processes (the console script's default).

    Built by `UnifiedLLMResource` with `engine_process=True`. Tokenization,
    detokenization, stop sequences, admission and cancellation stay here;
    token ids and logprobs come back over the pipe, one message per decode
    step. With several engine replicas (`--engine-replicas`), they serve as
    one core (`replicas.ReplicaCore`) and admission counts their sum; a
    replica of several tensor-parallel ranks (`--tensor-parallel`) is one
    `ProcessCore` over its rank 0, watching the others.

    Args:
        groups: the started engine processes, one group per replica: its
            ranks in order (one process without tensor parallelism).
        facts: the model's facts, as rank 0 of the first replica reported them.
        tokenizer: the tokenizer this process detokenizes with.
        settings: how each replica's batching is sized.
        default_max_new_tokens: the length used when a request leaves it unset.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[EngineProcess]],
        facts: ModelFacts,
        tokenizer: Any,
        *,
        settings: BatchingSettings,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        self.settings = settings
        # What the engine processes run: continuous batching, or padded batches
        # where it cannot run the model (`--engine auto`; every replica alike).
        self.kind = groups[0][0].engine
        self.processes = [ProcessCore(group[0], facts, settings, group[1:]) for group in groups]
        n = len(self.processes)
        self.remote: ProcessCore | ReplicaCore = self.processes[0] if n == 1 else ReplicaCore(self.processes)
        note = settings.capacity_note if n == 1 else f" ({n} engine replicas x{settings.capacity_note})"
        super().__init__(
            self.remote,
            facts,
            tokenizer,
            capacity=settings.capacity * n,
            capacity_note=note,
            max_sequence_tokens=settings.cache_tokens(facts.context_length),
            default_max_new_tokens=default_max_new_tokens,
        )
        # One replica's prefix cache: several replicas take a request's samples where each has room.
        self.shares_prefixes = self.kind == "batching" and settings.prefix_caching and n == 1
        # A forward pass of a tensor-parallel group needs every rank, which its batching loop owns.
        self.inputs.scores_prompts = all(len(group) == 1 for group in groups)

    @property
    def process(self) -> ProcessCore:
        """The (first) engine replica's core."""
        return self.processes[0]

    @property
    def child(self) -> EngineProcess:
        """The (first) engine process: the first replica's rank 0."""
        return self.process.child

    @property
    def children(self) -> list[EngineProcess]:
        """Each replica's engine process (its rank 0 under tensor parallelism)."""
        return [core.child for core in self.processes]

    @property
    def ranks(self) -> list[list[EngineProcess]]:
        """Every engine process: each replica's ranks."""
        return [core.ranks for core in self.processes]

    def per_core(self) -> list[tuple[int, bool]]:
        if isinstance(self.remote, ReplicaCore):
            return self.remote.per_replica()
        return super().per_core()
