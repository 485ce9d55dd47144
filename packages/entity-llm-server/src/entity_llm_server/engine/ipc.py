"""What crosses the pipe between the front end and its engine process: one class per message.

Pickled over a `multiprocessing` connection, dispatched with `match` on each
side (`process.ProcessCore`, `worker`). At start the front end sends a
`launcher.EngineSpec`; the engine process loads the model and the tokenizer
and answers `Ready` (with the tokenizer, from the first rank) or `Failed`
once, then serves:

- front end to engine: `Add`, `Cancel`, `StateQuery`, `Ping`, `Stop`;
- engine to front end: `Steps` (per batch of results: every request's new
  tokens from one decode step in one message), `StateReply`, `Pong`, and
  `Dead` when the batching thread dies.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .base import CoreState
from .core import ModelFacts, SeqOutput
from .sampling import Sampling

# -- front end to engine ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Add:
    """Start generating: the prompt's ids, the tokens to generate and the sampling."""

    rid: str
    ids: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling


@dataclass(frozen=True, slots=True)
class Cancel:
    """The request's client left: drop it at the next step."""

    rid: str


@dataclass(frozen=True, slots=True)
class StateQuery:
    """Ask for the core's state; answered with a `StateReply` carrying the same token."""

    token: int


@dataclass(frozen=True, slots=True)
class Ping:
    """A liveness check; answered with a `Pong` carrying the same token."""

    token: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the batching thread and exit."""


ToEngine = Add | Cancel | StateQuery | Ping | Stop


# -- engine to front end ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The model is loaded and warmed up; `engine` is the core that serves it:
    "batching", or "padded" where continuous batching cannot run it.
    `tokenizer` is the model's tokenizer as transformers' AutoTokenizer chose
    it, for the front end, which so never imports torch (unpickling a
    tokenizer imports its class's module only); None from other ranks."""

    facts: ModelFacts
    engine: str = "batching"
    tokenizer: Any = None


@dataclass(frozen=True, slots=True)
class Failed:
    """The model could not be loaded, or (`unsupported`) continuous batching
    cannot run it; the engine process then exits."""

    message: str
    unsupported: bool = False


@dataclass(frozen=True, slots=True)
class Steps:
    """Requests' news, and the requests decoding now."""

    outputs: tuple[SeqOutput, ...]
    active: int


@dataclass(frozen=True, slots=True)
class StateReply:
    """The answer to a `StateQuery`."""

    token: int
    state: CoreState


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a `Ping`."""

    token: int


@dataclass(frozen=True, slots=True)
class Dead:
    """The batching thread died: no request can be served any more."""

    reason: str


FromEngine = Ready | Failed | Steps | StateReply | Pong | Dead
Message = ToEngine | FromEngine


def send_all(conn: Connection, outbox: queue.SimpleQueue[Message | None]) -> Exception | None:
    """Send `outbox`'s messages over `conn`, in order, until a None (then return None)
    or a send that fails (then return its exception). Each side runs this on a
    thread of its own: a send blocks while the pipe is full."""
    while (message := outbox.get()) is not None:
        try:
            conn.send(message)
        except Exception as exc:  # a closed pipe (the other side is gone), or a message that cannot be pickled
            return exc
    return None
