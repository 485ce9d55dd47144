"""The engine process as the front end starts, waits for and stops it.

The front end sends it an `EngineSpec` (what to load) and the tokenizer's
facts, and it answers `Ready` with the model's facts once warmed up (see
`ipc`). `process.ProcessCore` talks to it once it runs; `worker` is its side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Pipe
from typing import Any

from .core import ModelFacts
from .ipc import Failed, Ready, TokenizerFacts
from .settings import BatchingSettings

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
        facts = TokenizerFacts(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
        with contextlib.suppress(OSError):  # a child that died already: wait_ready() says why
            self.conn.send(facts)

    def wait_ready(self) -> ModelFacts:
        """Block until the model is loaded and warmed up (however long a download or
        a graph capture takes, as in process); its facts, or EngineProcessError."""
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineProcessError(f"the engine process {self.exit_status()} while starting") from exc
        match message:
            case Ready(facts):
                return facts
            case Failed(reason):
                self.kill()
                raise EngineProcessError(reason)
            case _:
                self.kill()
                raise EngineProcessError(f"the engine process sent {type(message).__name__} while starting")

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
