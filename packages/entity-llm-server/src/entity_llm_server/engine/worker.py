"""The engine process: `python -m entity_llm_server.engine.worker FD PARENT_PID`.

The child side of `process` (read that module first). It loads the weights,
runs a `BatchingCore` (or a `padded.PaddedCore`: asked for, or where
continuous batching cannot run the model and the spec allows it), and talks
to the front end over the pipe whose end is file descriptor FD: a receiving
loop (the main thread) turns `ipc` messages
into calls on the core, and the core's outputs go back through a sender
thread. Everything it pickles is defined in other modules (`ipc`, `core`,
`sampling`), so nothing is named `__main__`.

A rank of a tensor-parallel group (`launcher.Rank`) runs the same: rank 0
gets the requests and reports the outputs, and transformers hands each step's
new requests and cancels to the other ranks, which only answer pings, report
their batching thread's death and stop.
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
from collections.abc import Sequence
from multiprocessing.connection import Connection

from .base import BatchingUnsupportedError, CoreState, EngineError
from .batching import BatchingCore
from .constraints import Grammars
from .core import ModelFacts, SeqOutput, settle
from .inputs import Prepared
from .ipc import (
    Add,
    Cancel,
    Dead,
    Failed,
    Message,
    Ping,
    Pong,
    Ready,
    StateQuery,
    StateReply,
    Steps,
    Stop,
    send_all,
)
from .launcher import EngineSpec
from .padded import PaddedCore, fallback_message

log = logging.getLogger(__name__)


def _sender(conn: Connection, outbox: queue.SimpleQueue[Message | None]) -> None:
    exc = send_all(conn, outbox)
    if exc is not None and not isinstance(exc, OSError):  # OSError: the front end is gone, and the receiver stops us
        # A silent sender would leave every stream waiting: end it all.
        log.error("the engine process cannot send a message (%s: %s); exiting", type(exc).__name__, exc)
        os._exit(1)


# The cores an engine process hosts: continuous batching, or padded batches
# where continuous batching cannot run the model.
Core = BatchingCore | PaddedCore


class _Worker:
    """The engine process's receiving loop, over a launched core."""

    def __init__(self, conn: Connection, core: Core) -> None:
        self.conn = conn
        self.core = core
        self.outbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()

    def deliver(self, outputs: Sequence[SeqOutput]) -> None:
        self.outbox.put(Steps(tuple(outputs), self.core.active))

    def dead(self, reason: str) -> None:
        self.outbox.put(Dead(reason))

    def run(self) -> None:
        sender = threading.Thread(target=_sender, args=(self.conn, self.outbox), name="entity-llm-engine-send")
        sender.daemon = True
        sender.start()
        self._receive()
        self.core.stop()
        self.outbox.put(None)
        sender.join(5)

    def _receive(self) -> None:
        core = self.core
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return
            match message:
                case Add(rid, ids, max_new_tokens, sampling):
                    try:
                        core.add(rid, Prepared(list(ids), max_new_tokens, False, sampling))
                        refused = None
                    except EngineError as exc:  # this request only: the others go on
                        refused = str(exc)
                    except Exception as exc:  # a malformed request: it alone fails
                        refused = f"the engine refused the request: {type(exc).__name__}: {exc}"
                    if refused is not None:
                        self.outbox.put(Steps((SeqOutput(rid, (), None, True, refused),), core.active))
                case Cancel(rid):
                    core.cancel(rid)
                case StateQuery(token):
                    try:
                        state = core.state()
                    except Exception:  # a diagnostic: never worth the engine
                        log.exception("reading the engine's state failed")
                        state = CoreState(-1, -1)
                    self.outbox.put(StateReply(token, state))
                case Ping(token):  # the front end's liveness check: this process and its core still run
                    if not core.stalled:  # a stuck core: no answer, and the front end calls the process stalled
                        self.outbox.put(Pong(token))
                case Stop():
                    return
                case other:
                    log.error("the engine process got %r, which it does not serve; ignored", other)


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
    from ..resource import ModelLoadError, UnifiedLLMResource

    configure_logging(spec.log_level, spec.log_format)
    try:
        resource = UnifiedLLMResource(
            spec.model, device=spec.device, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code
        )
        # A rank of a tensor-parallel group: its environment says where the others are.
        model = resource.load_model(tensor_parallel=1 if spec.rank is None else spec.rank.world_size)
        # Loaded here, where torch is anyway: the front end gets it in Ready.
        tokenizer = resource.tokenizer()
        facts = ModelFacts.of(model, len(tokenizer), tokenizer.eos_token_id)
        grammars = Grammars.of(tokenizer, facts)

        def padded() -> PaddedCore:
            return PaddedCore(
                model,
                facts,
                max_batch_size=spec.batching.max_batch_size,
                pad_token_id=tokenizer.pad_token_id,
                grammars=grammars,
            )

        core: Core
        if spec.engine == "padded":
            core = padded()
        else:
            core = BatchingCore(
                model,
                facts,
                spec.batching,
                pad_token_id=tokenizer.pad_token_id,
                grammars=grammars,
                default_max_new_tokens=spec.default_max_new_tokens,
            )
        worker = _Worker(conn, core)
        try:
            core.launch(worker.deliver, worker.dead)
        except BatchingUnsupportedError as exc:
            if spec.engine != "auto" or spec.rank is not None:
                raise
            log.warning("%s", fallback_message(exc))
            core = worker.core = padded()
            core.launch(worker.deliver, worker.dead)
    except BatchingUnsupportedError as exc:  # the front end may serve the model another way
        with contextlib.suppress(OSError):
            conn.send(Failed(str(exc), unsupported=True))
        return 1
    except ModelLoadError as exc:  # says what is wrong already (a tokenizer that cannot load, say)
        with contextlib.suppress(OSError):
            conn.send(Failed(str(exc)))
        return 1
    except Exception as exc:  # anything: the front end reports it and exits cleanly
        message = str(exc)
        if not message.startswith("cannot load model"):
            message = f"cannot load model {spec.model!r} on {spec.device}: {type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            conn.send(Failed(message))
        return 1
    engine = "padded" if isinstance(core, PaddedCore) else "batching"
    settle()
    conn.send(Ready(facts, engine, tokenizer if spec.rank is None or spec.rank.rank == 0 else None))
    worker.run()
    return 0


if __name__ == "__main__":
    code = serve(int(sys.argv[1]), int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the batching thread is stopped; skip tearing down torch's threads
