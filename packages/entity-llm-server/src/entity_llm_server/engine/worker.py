"""The engine process: `python -m entity_llm_server.engine.worker FD PARENT_PID`.

The child side of `engine.process` (read that module first). It loads the
weights, runs the batching manager, and talks to the front end over the pipe
whose end is file descriptor FD: a receiving loop (the main thread), a result
pump and a sender. Everything it pickles is defined in other modules
(`engine.child`, `engine.sampling`), so nothing is named `__main__`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from .base import CoreState
from .batching import BatchingEngine
from .child import EngineSpec, ModelFacts, TokenizerFacts

log = logging.getLogger(__name__)


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
            elif kind == "state":
                try:
                    state = self.engine.core_state()
                except Exception:  # a diagnostic: never worth the engine
                    log.exception("reading the engine's state failed")
                    state = CoreState(-1, -1)
                self.outbox.put(("state", message[1], state))
            elif kind == "ping":  # the front end's liveness check: this process still runs
                self.outbox.put(("pong", message[1]))
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


if __name__ == "__main__":
    code = serve(int(sys.argv[1]), int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the batching thread is stopped; skip tearing down torch's threads
