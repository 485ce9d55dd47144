"""The engine process as the front end starts, waits for and stops it, and
what crosses its pipe at start: the spec it loads, the tokenizer's facts it
needs, the model's facts it answers with. `process.py` talks to it once it
runs; `worker.py` is its side.
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

from .batching import BatchingSettings

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
