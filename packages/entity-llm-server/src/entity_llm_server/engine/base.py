"""The seam between the protocol and the model: engine requests and events."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .sampling import GREEDY, Sampling, TokenLogprob

# The length of a request that leaves max_new_tokens unset, unless the server
# is started with another (`--max-new-tokens`).
DEFAULT_MAX_NEW_TOKENS = 128

# While an RPC is traced, its interceptor puts a list here (in the RPC's own
# context) and the front end appends the moment (time.perf_counter) it hands
# the request to its core: where queueing ends and the prefill begins.
HANDOFF: ContextVar[list[float] | None] = ContextVar("entity_llm_handoff", default=None)


class FinishReason(enum.Enum):
    """Why a generation ended normally."""

    MAX_TOKENS = "max_tokens"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    TIME_LIMIT = "time_limit"
    TOKEN_LIMIT = "token_limit"
    STOP_TOKEN = "stop_token"


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """What the engine needs to generate one completion.

    Attributes:
        prompt: the text to continue.
        max_new_tokens: the most tokens to generate; None takes the engine's
            default.
        request_id: an identifier for logs and cancellation.
        stop_sequences: texts that end generation where they appear.
        include_stop_sequence: keep the matched stop text in the output.
        truncate_input_tokens: keep only the last N prompt tokens.
        time_limit_ms: end normally (TIME_LIMIT) after this long.
        sampling: how tokens are chosen (greedy by default); a sampled
            request without a seed gets one from the engine.
        messages: a conversation ((role, content) pairs) to render with the
            chat template, instead of `prompt`.
        prompt_token_ids: the prompt as token ids, used as they are, instead
            of `prompt`.
        n: samples (independent generations) of the prompt in one stream
            (`samples`); their events carry their index.
    """

    prompt: str
    max_new_tokens: int | None = None
    request_id: str = ""
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    truncate_input_tokens: int | None = None
    time_limit_ms: int | None = None
    sampling: Sampling = GREEDY
    messages: tuple[tuple[str, str], ...] = ()
    prompt_token_ids: tuple[int, ...] = ()
    n: int = 1


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Newly decoded text and the token ids that produced it.

    `text` never ends inside a multi-byte UTF-8 character; it may be empty
    only when `token_ids` completed no printable text yet, and engines do not
    emit such deltas.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0  # the sample it belongs to (EngineRequest.n)


@dataclass(frozen=True, slots=True)
class Scored:
    """The prompt's logprobs (EngineRequest's sampling.prompt_logprobs), before any text.

    Attributes:
        prompt_logprobs: one entry per prompt token after the first: its
            logprob and rank given the tokens before it, and the likeliest
            alternatives at its position.
        index: the sample it belongs to (sample 0 of EngineRequest.n).
    """

    prompt_logprobs: tuple[TokenLogprob, ...]
    index: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every successful generation.

    Attributes:
        reason: why generation ended.
        input_tokens: prompt tokens the model saw (after truncation).
        generated_tokens: tokens the model produced (an EOS included).
        token_ids: every id generated, in order.
        stop_sequence: the stop sequence that matched, if one did.
        tail_ids: ids no TextDelta carried (an EOS, bytes of an unfinished
            character, text trimmed with a stop sequence).
        tail_logprobs: their logprobs, when the request asked for logprobs.
        seed: the sampler's seed, for a sampled request.
        stop_token_id: the stop token that ended it (reason STOP_TOKEN).
        cached_tokens: prompt tokens taken from the prefix cache, not computed.
        index: the sample it ends (EngineRequest.n).
    """

    reason: FinishReason
    input_tokens: int
    generated_tokens: int
    token_ids: tuple[int, ...] = field(default=())
    stop_sequence: str = ""
    tail_ids: tuple[int, ...] = ()
    tail_logprobs: tuple[TokenLogprob, ...] = ()
    seed: int | None = None
    stop_token_id: int | None = None
    cached_tokens: int = 0
    index: int = 0


EngineEvent = TextDelta | Scored | Finished


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the engine serves and its limits (GetModelInfo)."""

    model_id: str
    context_length: int
    vocab_size: int
    default_max_new_tokens: int
    max_max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool
    engine: str = ""
    constraint_kinds: tuple[str, ...] = ()  # the structured-output constraints it applies


@dataclass(frozen=True, slots=True)
class CoreState:
    """What an engine's core holds, read from its own bookkeeping (for tests and operators).

    Attributes:
        held: requests the core still holds: queued, waiting or decoding. A
            cancelled request leaves this count when the core drops it, not
            when its stream closes in the front end.
        steps: forward passes (decode steps) the core has run since it started.
    """

    held: int
    steps: int


@dataclass(frozen=True, slots=True)
class Tokens:
    """A text's tokens (Tokenize)."""

    ids: tuple[int, ...]
    pieces: tuple[str, ...]


class EngineError(Exception):
    """The engine failed; the request cannot complete."""


class EngineOverloadedError(Exception):
    """The engine holds as many requests as it may; this one is refused."""


class EngineUnavailableError(Exception):
    """The engine cannot take a request now (it does not answer); a later try may succeed."""


class BatchingUnsupportedError(RuntimeError):
    """Continuous batching cannot run this model: its start-up probe (a real
    batched generation) failed. The message names the architecture and why."""


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

    `generate()` yields a `Scored` event first when the request asked for
    its prompt's logprobs, then zero or more `TextDelta` events, then exactly
    one `Finished` (each of EngineRequest.n samples its own, the samples'
    events interleaved), or raises. Closing the iterator early (a client that left)
    must free the request's resources in the engine.
    """

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        """Stream the events of one generation."""
        ...

    @property
    def healthy(self) -> bool:
        """Whether the engine can serve (started, and not failed)."""
        ...

    def info(self) -> ModelInfo:
        """The served model and the engine's limits."""
        ...

    def tokenize(self, text: str, truncate: int | None = None) -> Tokens:
        """The model's tokens for `text`, keeping the last `truncate` when given."""
        ...

    async def start(self) -> None:
        """Load whatever is needed to serve; idempotent."""
        ...

    async def close(self) -> None:
        """Release the engine's resources; idempotent."""
        ...

    def occupancy(self) -> tuple[int, int]:
        """(decoding, waiting) requests now, for metrics; may be read from another thread."""
        ...
