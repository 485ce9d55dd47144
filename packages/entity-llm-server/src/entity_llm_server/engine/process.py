"""The batching engine in a process of its own, behind a pipe.

In one process, the gRPC event loop and transformers' batching thread share
one GIL: every token's detokenization, stop matching, protobuf and gRPC write
waits for the batching loop's Python scheduling between torch calls, and the
other way round (profiled at 32 streams: the batching thread busy about 78% of
the time, the event loop 14%, hardly ever at once). Here the model runs in a
child process (`python -m entity_llm_server.engine.worker FD PID`) and the gRPC
process keeps only the tokenizer, so the two loops run in parallel.

What crosses the pipe (pickled tuples over a `multiprocessing` connection):

- front end to engine: ``("add", rid, ids, max_new_tokens, sampling)``,
  ``("cancel", rid)``, ``("held", token)``, ``("stop",)``;
- engine to front end: ``("ready", facts)`` or ``("failed", message)`` once,
  then ``("step", [(rid, new_ids, logprobs, finished, error), ...], active)``
  per batch of results (one per decode step, every sequence's new tokens in
  one message), ``("held", token, count)``, and ``("dead", reason)`` when the
  batching thread dies.

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
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from typing import Any

from .base import EngineError, EngineRequest
from .batching import _DEAD, BatchingEngine, BatchingSettings
from .tokens import Prepared, Step

log = logging.getLogger(__name__)

STOP_TIMEOUT = 45.0  # seconds a stopping engine process gets (its own stop waits up to 40)


class EngineProcessError(RuntimeError):
    """The engine process could not load its model or start."""


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What the engine process loads: the arguments of `UnifiedLLMResource`, and how to log."""

    model: str
    device: str
    dtype: str
    default_max_new_tokens: int
    batching: BatchingSettings
    log_level: str = "WARNING"
    log_format: str = "text"


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the front end knows of the model in the engine process.

    The attributes mirror those of a transformers model that the engines read
    (`config`, `generation_config`, `device`, `name_or_path`), so the front end
    sizes, validates and admits requests with `BatchingEngine`'s own code.
    """

    name_or_path: str
    max_position_embeddings: int
    vocab_size: int
    eos_token_id: tuple[int, ...]
    device_type: str

    @property
    def config(self) -> ModelFacts:
        return self

    @property
    def generation_config(self) -> ModelFacts:
        return self

    @property
    def device(self) -> ModelFacts:
        return self

    @property
    def type(self) -> str:
        return self.device_type


@dataclass(frozen=True, slots=True)
class TokenizerFacts:
    """What the batching engine reads of a tokenizer, sent by the front end.

    Loading a tokenizer through transformers takes most of a second on a
    small CPU; the engine process only needs these three facts, and gets them
    while it loads the weights.
    """

    pad_token_id: int | None
    eos_token_id: int | None
    size: int

    def __len__(self) -> int:
        return self.size


def _kill_quietly(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        with contextlib.suppress(OSError):
            popen.kill()


class EngineProcess:
    """A started engine process and the front end's end of its pipe."""

    def __init__(self, spec: EngineSpec) -> None:
        ours, theirs = Pipe(duplex=True)
        try:
            stdout: Any = sys.stderr.fileno()  # the child's prints must not mix into our stdout
        except (AttributeError, OSError, ValueError):  # a replaced stderr (pytest's capture)
            stdout = None
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "entity_llm_server.engine.worker", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
        )
        theirs.close()
        self.conn = ours
        # An engine that nobody closes (a load abandoned half way) dies with its owner.
        weakref.finalize(self, _kill_quietly, self.popen)
        self.conn.send(spec)

    def send_tokenizer(self, tokenizer: Any) -> None:
        """Tell the engine process what it needs of the tokenizer (it loads none itself)."""
        facts = TokenizerFacts(tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer))
        with contextlib.suppress(OSError):  # a child that died already: wait_ready() says why
            self.conn.send(facts)

    def wait_ready(self) -> ModelFacts:
        """Block until the model is loaded and warmed up (however long a download or
        a graph capture takes, as in process); its facts, or EngineProcessError."""
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineProcessError(f"the engine process {self.exit_status()} while starting") from exc
        if message[0] == "failed":
            self.kill()
            raise EngineProcessError(message[1])
        facts: ModelFacts = message[1]
        return facts

    def exit_status(self, wait: float = 10) -> str:
        """How the engine process ended, for messages: "exited (code N)" or "was killed by SIGNAME"."""
        try:
            code = self.popen.wait(wait)
        except subprocess.TimeoutExpired:
            return "closed its pipe"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited (code {code})"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """Stop the engine process now (blocking until it is gone) and close the pipe."""
        with contextlib.suppress(OSError):
            self.popen.kill()
        self.popen.wait()
        self.conn.close()

    def stop(self) -> None:
        """Wait for a stopping engine process (blocking), killing it past STOP_TIMEOUT."""
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop within %g s; killing it", STOP_TIMEOUT)
        self.kill()


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
        self._send_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._active = 0
        self._held_replies: dict[int, int] = {}
        self._held_events: dict[int, threading.Event] = {}

    @property
    def healthy(self) -> bool:
        return self._started and self._failure is None and self.child.alive

    async def start(self) -> None:
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        # Results are read on the event loop itself when the pipe is readable:
        # no thread of ours competes for this process's GIL.
        self._loop.add_reader(self._conn.fileno(), self._readable)
        self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started and self._loop is not None:
            self._started = False
            self._loop.remove_reader(self._conn.fileno())
            with contextlib.suppress(EngineError):
                self._send(("stop",))
            await asyncio.to_thread(self.child.stop)
        else:  # loaded, never started: nothing runs there worth waiting for
            await asyncio.to_thread(self.child.kill)
        self._fail_waiting()

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:  # a closed pipe: the engine process is gone
            raise EngineError(f"engine has failed: the engine process is gone ({exc!r})") from exc

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
                elif kind == "held":
                    self._held_replies[message[1]] = message[2]
                    if (event := self._held_events.get(message[1])) is not None:
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
        for event in list(self._held_events.values()):  # held_requests() answers 0 at once
            event.set()

    def held_requests(self) -> int:
        """Requests the engine process still holds; call it from a thread other than the event loop."""
        if not self.healthy:
            return 0
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread, as it must be
            here = None
        if here is not None and here is self._loop:
            raise RuntimeError("held_requests() waits for the event loop: call it from another thread")
        token = next(self._ids)
        event = self._held_events[token] = threading.Event()
        try:
            self._send(("held", token))
            if not event.wait(30):
                raise EngineError("the engine process did not answer")
            return self._held_replies.get(token, 0)  # 0: woken by the engine's death
        finally:
            del self._held_events[token]
            self._held_replies.pop(token, None)

    def load(self) -> tuple[int, int]:
        held = self.in_flight
        active = min(self._active, held, self.settings.max_batch_size)
        return (active, held - active)


# -- the engine process -------------------------------------------------------


class _Worker:
    """The engine process: a receiving loop (main thread), a result pump and a sender."""

    def __init__(self, conn: Connection, engine: BatchingEngine, manager: Any) -> None:
        self.conn = conn
        self.engine = engine
        self.manager = manager
        self.sampling = engine.sampling_processors
        self.outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.seen: dict[str, int] = {}  # request id -> tokens already sent
        self.lock = threading.Lock()  # `seen` and the logprob records, between receiver and pump
        self.stopping = threading.Event()

    def run(self) -> None:
        sender = threading.Thread(target=self._send_loop, name="entity-llm-engine-send", daemon=True)
        pump = threading.Thread(target=self._pump, name="entity-llm-engine-results", daemon=True)
        sender.start()
        pump.start()
        self._receive()
        self.stopping.set()
        self.engine._stop()
        pump.join(5)
        self.outbox.put(None)
        sender.join(5)

    def _send_loop(self) -> None:
        while (message := self.outbox.get()) is not None:
            try:
                self.conn.send(message)
            except OSError:  # the front end is gone; the receiver sees EOF and stops us
                return
            except Exception:  # a silent sender would leave every stream waiting: end it all
                log.exception("the engine process cannot send a message; exiting")
                os._exit(1)

    def _forget(self, rid: str) -> None:
        self.seen.pop(rid, None)
        self.sampling.logprobs.pop(rid, None)
        self.sampling.faults.pop(rid, None)

    def _receive(self) -> None:
        manager = self.manager
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "add":
                _, rid, ids, max_new_tokens, sampling = message
                with self.lock:
                    self.seen[rid] = 0
                    if sampling.wants_logprobs:
                        self.sampling.logprobs[rid] = []
                try:
                    added = manager.add_request(
                        ids,
                        request_id=rid,
                        max_new_tokens=max_new_tokens,
                        streaming=True,
                        sampling=sampling,
                        prompt_len=len(ids),
                    )
                    refused = None if added is not None else "the batching thread is not running"
                except Exception as exc:  # this request only: the others go on
                    refused = f"the engine refused the request: {type(exc).__name__}: {exc}"
                if refused is not None:
                    with self.lock:
                        self._forget(rid)
                    self.outbox.put(("step", [(rid, [], None, True, refused)], 0))
            elif kind == "cancel":
                with self.lock:
                    self._forget(rid := message[1])
                manager.cancel_request(rid)
            elif kind == "held":
                try:
                    held = self.engine.held_requests()
                except Exception:  # a diagnostic: never worth the engine
                    log.exception("counting the held requests failed")
                    held = -1
                self.outbox.put(("held", message[1], held))
            elif kind == "stop":
                return

    def _pump(self) -> None:
        try:
            self._pump_steps()
        except Exception as exc:  # a bug here would leave every stream waiting: fail them instead
            log.exception("the engine process's result pump failed")
            self.outbox.put(("dead", f"the engine's result pump failed: {type(exc).__name__}: {exc}"))

    def _pump_steps(self) -> None:
        manager = self.manager
        records = self.sampling.logprobs
        faults = self.sampling.faults
        while not self.stopping.is_set():
            output = manager.get_result(timeout=0.1)
            if output is None:
                if not manager.is_running() and not self.stopping.is_set():
                    error = manager.background_thread_status.fatal_error
                    self.outbox.put(("dead", f"the batching thread stopped: {error!r}"))
                    return
                continue
            outputs = [output]
            while (more := manager.get_result(timeout=0)) is not None:
                outputs.append(more)
            batch = []
            cancel = []
            with self.lock:
                for out in outputs:
                    rid = out.request_id
                    seen = self.seen.get(rid)
                    if seen is None:  # cancelled, or already ended
                        continue
                    error = None
                    if out.error is not None:
                        error = f"generation failed: {out.error}"
                    elif (fault := faults.get(rid)) is not None:
                        error = f"sampling failed: {fault}"
                    tokens = out.generated_tokens  # every token so far, not only the new ones
                    log_so_far = records.get(rid)
                    logprobs = None if log_so_far is None else log_so_far[seen : len(tokens)]
                    finished = out.is_finished() or error is not None
                    batch.append((rid, list(tokens[seen:]), logprobs, finished, error))
                    if finished:
                        self._forget(rid)
                        if not out.is_finished():
                            cancel.append(rid)
                    else:
                        self.seen[rid] = len(tokens)
            for rid in cancel:
                manager.cancel_request(rid)
            if batch:
                self.outbox.put(("step", batch, self._active()))

    def _active(self) -> int:
        try:
            return len(self.manager.batch_processor.scheduler.active_requests)
        except AttributeError:
            return len(self.seen)


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def serve(fd: int, parent: int) -> int:
    """The engine process's life, on the pipe whose end is file descriptor `fd`; its exit code.

    `parent` is the front end's pid, passed by the front end itself: read here
    with getppid(), it would already be init's if the front end died while
    this process was starting.
    """
    conn = Connection(fd)
    # A drain in the front end needs this process to finish the streams in
    # flight: a Ctrl-C sent to the whole process group must not stop it. It
    # stops when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # It reads its pipe only once the weights are loaded: a front end that dies
    # before (SIGKILL, or SIGTERM before its handlers are set) must not leave
    # it loading for minutes, holding the memory a restarted server needs.
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="entity-llm-engine-parent", daemon=True).start()
    spec: EngineSpec = conn.recv()
    from ..logs import configure_logging
    from ..resource import UnifiedLLMResource

    configure_logging(spec.log_level, spec.log_format)
    try:
        resource = UnifiedLLMResource(spec.model, device=spec.device, dtype=spec.dtype)
        model = resource.load_model()
        tokenizer: TokenizerFacts = conn.recv()
        engine = BatchingEngine(
            model, tokenizer, settings=spec.batching, default_max_new_tokens=spec.default_max_new_tokens
        )
        manager = engine.launch()
    except Exception as exc:  # anything: the front end reports it and exits cleanly
        message = str(exc)
        if not message.startswith("cannot load model"):
            message = f"cannot load model {spec.model!r} on {spec.device}: {type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            conn.send(("failed", message))
        return 1
    model = engine.model
    facts = ModelFacts(
        name_or_path=str(getattr(model, "name_or_path", "") or ""),
        max_position_embeddings=engine.context_length,
        vocab_size=engine.vocab_size,
        eos_token_id=tuple(sorted(engine.eos_ids)),
        device_type=str(model.device.type),
    )
    conn.send(("ready", facts))
    _Worker(conn, engine, manager).run()
    return 0
