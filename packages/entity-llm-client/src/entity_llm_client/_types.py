"""Typed values the client takes and returns."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict


class SampleOptions(TypedDict, total=False):
    """The request parameters `samples()` takes as keywords: those of `GenerateOptions` but `n`.

    `samples()` takes `n` as a parameter of its own (required there).
    """

    max_new_tokens: int | None
    min_new_tokens: int | None
    stop_sequences: Sequence[str]
    include_stop_sequence: bool
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    truncate_input_tokens: int | None
    time_limit_ms: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    min_p: float | None
    typical_p: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: Mapping[int, float]
    seed: int | None
    logprobs: bool
    top_logprobs: int
    prompt_logprobs: int | None
    request_id: str
    # Structured output: at most one of these.
    json_schema: str | Mapping[str, Any] | type
    json_object: bool
    regex: str
    choice: Sequence[str]
    grammar: str


class GenerateOptions(SampleOptions, total=False):
    """The request parameters `generate()` and `complete()` take as keywords.

    Every one is optional; leaving one out (or passing None) leaves it unset on
    the wire, and the server applies its default. See `LLMClient.generate`.
    """

    n: int | None


class FinishReason(enum.Enum):
    """Why a generation ended normally."""

    MAX_TOKENS = "max_tokens"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    TIME_LIMIT = "time_limit"
    TOKEN_LIMIT = "token_limit"
    STOP_TOKEN = "stop_token"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one generation.

    Attributes:
        input_tokens: prompt tokens the model saw (after truncation).
        generated_tokens: tokens the model produced.
        cached_tokens: of `input_tokens`, those the server took from its
            prefix cache (an earlier prompt that began the same way) rather
            than computing them.
    """

    input_tokens: int
    generated_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One likely alternative for a generated token.

    Attributes:
        token_id: the alternative's token id.
        logprob: its natural-log probability.
        text: its text, decoded alone.
    """

    token_id: int
    logprob: float
    text: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability: a generated token's, or a prompt token's.

    Generated tokens have them when the request asks for `logprobs` or
    `top_logprobs`; prompt tokens when it asks for `prompt_logprobs` (as
    `score()` does).

    Attributes:
        token_id: the token's id.
        logprob: its natural-log probability: a generated token's under the
            distribution it was chosen from (after every change the request
            makes to the logits: penalties, biases, temperature and the
            sampling filters); a prompt token's under the model's own
            distribution at its position, given the tokens before it.
        top_logprobs: the most likely tokens of that distribution, most likely
            first (`top_logprobs` of them, or `prompt_logprobs` of them for
            a prompt token; empty unless asked for).
        rank: the token's rank in that distribution: 1 for the most likely
            token, 2 for the next, and so on (tokens of equal probability
            share a rank); 0 from servers that predate it.
    """

    token_id: int
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()
    rank: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of generated text.

    `str(chunk)` is its text, so `print(chunk, end="")` prints the stream. The
    last chunk of a stream carries `finish_reason` and `usage` (its text may
    be empty); the others have `finish_reason` None. A stream of `n` samples
    interleaves their chunks, each marked with its sample's `index`, and
    every sample ends with a last chunk of its own. A request with
    `prompt_logprobs` streams, before any text, a chunk of its own that
    carries them: its `text` is empty, its `token_ids` and `logprobs` too,
    its `finish_reason` None (sample 0's, with `n`).

    Attributes:
        text: the decoded text; never splits a multi-byte UTF-8 character.
        token_ids: the ids of the tokens behind `text`.
        request_id: the request's id (sent, or made by the server).
        finish_reason: why generation ended; None until the last chunk.
        stop_sequence: the stop sequence that ended it, if one did.
        stop_token_id: the stop token that ended it, on the last chunk, if
            one did (a generated token: counted, and in `token_ids`).
        usage: token counts, on the last chunk.
        logprobs: one entry per id in `token_ids`, in order, when the request
            asked for logprobs; empty otherwise.
        seed: the sampler's seed, on the last chunk of a sampled stream
            (None otherwise): send it back as `seed` to repeat the stream.
        index: the sample the chunk belongs to (0 to n - 1; 0 without `n`).
        prompt_logprobs: the prompt's scores, on the chunk that carries them
            (the stream's first; empty on every other): one entry per prompt
            token after the first, in order, as the model saw the prompt
            (after truncation; a chat as its template rendered it).
    """

    text: str
    token_ids: tuple[int, ...] = ()
    request_id: str = ""
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    seed: int | None = None
    stop_token_id: int | None = None
    index: int = 0
    prompt_logprobs: tuple[TokenLogprob, ...] = ()

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole generation, as `complete()` returns it (and `samples()`, one per sample).

    Attributes:
        text: all the generated text.
        token_ids: all the generated token ids.
        finish_reason: why generation ended.
        usage: token counts.
        stop_sequence: the stop sequence that ended it, if one did.
        request_id: the request's id (sent, or made by the server).
        logprobs: every chunk's logprobs, in order (empty unless asked for).
        seed: the sampler's seed of a sampled generation (None if greedy).
        stop_token_id: the stop token that ended it, if one did (a
            generated token: counted, and in `token_ids`).
        prompt_logprobs: the prompt's scores, when the request asked for
            `prompt_logprobs` (empty otherwise; of `samples()`, on sample
            0's completion only): one entry per prompt token after the first.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    stop_sequence: str = ""
    request_id: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    seed: int | None = None
    stop_token_id: int | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


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
    engine: str = ""  # "batching", "padded" or "sequential"; empty from servers that predate it
    constraint_kinds: tuple[str, ...] = ()  # the structured-output options the server applies
