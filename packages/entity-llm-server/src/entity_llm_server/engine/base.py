"""The seam between the protocol and the model: engine requests and events."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class FinishReason(enum.Enum):
    """Why a generation ended normally."""

    MAX_TOKENS = "max_tokens"
    EOS = "eos"


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """What the engine needs to generate one completion.

    Attributes:
        prompt: the text to continue.
        max_new_tokens: the most tokens to generate; None takes the engine's
            default.
        request_id: an identifier for logs and cancellation.
    """

    prompt: str
    max_new_tokens: int | None = None
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Newly decoded text and the token ids that produced it.

    `text` never ends inside a multi-byte UTF-8 character; it may be empty
    only when `token_ids` completed no printable text yet, and engines do not
    emit such deltas.
    """

    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every successful generation."""

    reason: FinishReason
    input_tokens: int
    generated_tokens: int
    token_ids: tuple[int, ...] = field(default=())


EngineEvent = TextDelta | Finished


class EngineError(Exception):
    """The engine failed; the request cannot complete."""


class EngineOverloadedError(Exception):
    """The engine holds as many requests as it may; this one is refused."""


class InvalidRequestError(ValueError):
    """A request the engine cannot serve as given.

    Attributes:
        field: the request field at fault, as named in the protocol.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


@runtime_checkable
class Engine(Protocol):
    """Generates text; the servicer depends on nothing else.

    `generate()` yields zero or more `TextDelta` events then exactly one
    `Finished`, or raises. Closing the iterator early (a client that left)
    must free the request's resources in the engine.
    """

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        """Stream the events of one generation."""
        ...

    @property
    def healthy(self) -> bool:
        """Whether the engine can serve (started, and not failed)."""
        ...

    async def start(self) -> None:
        """Load whatever is needed to serve; idempotent."""
        ...

    async def close(self) -> None:
        """Release the engine's resources; idempotent."""
        ...
