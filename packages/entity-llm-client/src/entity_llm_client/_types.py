"""Typed values the client returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    """Why a generation ended normally."""

    MAX_TOKENS = "max_tokens"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    TIME_LIMIT = "time_limit"
    TOKEN_LIMIT = "token_limit"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one generation.

    Attributes:
        input_tokens: prompt tokens the model saw (after truncation).
        generated_tokens: tokens the model produced.
    """

    input_tokens: int
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of generated text.

    `str(chunk)` is its text, so `print(chunk, end="")` prints the stream. The
    last chunk of a stream carries `finish_reason` and `usage` (its text may
    be empty); the others have `finish_reason` None.

    Attributes:
        text: the decoded text; never splits a multi-byte UTF-8 character.
        token_ids: the ids of the tokens behind `text`.
        request_id: the request's id (sent, or made by the server).
        finish_reason: why generation ended; None until the last chunk.
        stop_sequence: the stop sequence that ended it, if one did.
        usage: token counts, on the last chunk.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    request_id: str = ""
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    usage: Usage | None = None

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole generation, as `complete()` returns it."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    stop_sequence: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Tokens:
    """A text's tokens in the served model's vocabulary."""

    ids: tuple[int, ...]
    pieces: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The served model and the server's limits."""

    model_id: str
    context_length: int
    vocab_size: int
    default_max_new_tokens: int
    max_max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool
