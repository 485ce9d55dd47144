"""Method handles and message conversion: betterproto2 messages on grpcio channels."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._gen.entity.grpc import (
    ChatMessage,
    Choices,
    GenerateRequest,
    GenerateResponse,
    GetModelInfoRequest,
    GetModelInfoResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobs,
)
from ._gen.entity.grpc import (
    FinishReason as WireFinishReason,
)
from ._types import (
    Chunk,
    Completion,
    FinishReason,
    GenerateOptions,
    ModelInfo,
    SampleOptions,
    TokenLogprob,
    Tokens,
    TopLogprob,
    Usage,
)

SERVICE = "entity.grpc.LLMService"

_FINISH = {
    WireFinishReason.MAX_TOKENS: FinishReason.MAX_TOKENS,
    WireFinishReason.EOS: FinishReason.EOS,
    WireFinishReason.STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
    WireFinishReason.TIME_LIMIT: FinishReason.TIME_LIMIT,
    WireFinishReason.TOKEN_LIMIT: FinishReason.TOKEN_LIMIT,
    WireFinishReason.STOP_TOKEN: FinishReason.STOP_TOKEN,
}


class _WithMetadata:
    """A method handle that sends `metadata` (an API key) ahead of each call's own."""

    __slots__ = ("_call", "_metadata")

    def __init__(self, call: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._call = call
        self._metadata = metadata

    def __call__(self, request: Any, *, metadata: Iterable[tuple[str, str]] = (), **kwargs: Any) -> Any:
        return self._call(request, metadata=self._joined(metadata), **kwargs)

    def future(self, request: Any, *, metadata: Iterable[tuple[str, str]] = (), **kwargs: Any) -> Any:
        """A sync unary call as a grpc.Future."""
        return self._call.future(request, metadata=self._joined(metadata), **kwargs)

    def _joined(self, metadata: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        extra = tuple(metadata)
        # A call's own `authorization` replaces the client's key: the server
        # refuses a call that carries two.
        keys = {name.lower() for name, _ in extra}
        own = tuple(entry for entry in self._metadata if entry[0] not in keys)
        return (*own, *extra)


class Methods:
    """The service's method handles on one channel (sync or aio: same calls).

    Args:
        channel: a grpcio channel, sync or aio.
        metadata: sent with every call (the API key).
    """

    def __init__(self, channel: Any, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        def handle(kind: str, name: str, request: Any, response: Any) -> Any:
            call = getattr(channel, kind)(
                f"/{SERVICE}/{name}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            return _WithMetadata(call, metadata) if metadata else call

        self.generate = handle("unary_stream", "Generate", GenerateRequest, GenerateResponse)
        self.tokenize = handle("unary_unary", "Tokenize", TokenizeRequest, TokenizeResponse)
        self.model_info = handle("unary_unary", "GetModelInfo", GetModelInfoRequest, GetModelInfoResponse)


_UINT32 = (
    "max_new_tokens",
    "min_new_tokens",
    "truncate_input_tokens",
    "time_limit_ms",
    "top_k",
    "top_logprobs",
    "n",
    "prompt_logprobs",
)
_FLOATS = ("temperature", "top_p", "repetition_penalty", "min_p", "typical_p", "presence_penalty", "frequency_penalty")
_FLOAT32_MAX = 3.4028234663852886e38  # the wire's floats are 32-bit


def _unsigned(name: str, value: Any, bits: int = 32) -> int:
    """`value` as a uint32/uint64 field: an int in range (a bool or a float is a TypeError)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < 2**bits:
        raise ValueError(f"{name} must be between 0 and {2**bits - 1}, got {value}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        raise ValueError(
            f"{name} is too large for the wire's 32-bit float: an int of {len(str(value))} digits"
        ) from None
    if math.isfinite(number) and abs(number) > _FLOAT32_MAX:
        raise ValueError(f"{name} is too large for the wire's 32-bit float: {value}")
    return number


def _token_ids(name: str, value: Any) -> list[int]:
    """`value` as a repeated uint32 field of token ids."""
    if isinstance(value, str | bytes | int) or not isinstance(value, Iterable):
        raise TypeError(f"{name} takes a sequence of token ids (ints); put a single one in a list")
    return [_unsigned(f"{name}[{i}]", token_id) for i, token_id in enumerate(value)]


def _logit_bias(value: Any) -> dict[int, float]:
    """`logit_bias` as the wire's map<uint32, float>."""
    if not isinstance(value, Mapping):
        raise TypeError(f"logit_bias takes a mapping of token ids to biases, got {type(value).__name__}")
    return {
        _unsigned(f"logit_bias key {token_id!r}", token_id): _float(f"logit_bias[{token_id}]", bias)
        for token_id, bias in value.items()
    }


def _text(name: str, value: Any) -> str:
    """`value` as a string field: a str that UTF-8 can encode (a lone surrogate cannot)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name} is not valid text: {error.reason} at index {error.start}") from None
    return value


def _checked(options: GenerateOptions) -> dict[str, Any]:
    """The options as GenerateRequest fields (None: not sent).

    A value of the wrong type is a TypeError, one the wire cannot carry a
    ValueError, both naming the option.
    """
    fields: dict[str, Any] = {name: value for name, value in options.items() if value is not None}
    for name, bits in [*((n, 32) for n in _UINT32), ("seed", 64)]:
        if name in fields:
            fields[name] = _unsigned(name, fields[name], bits)
    for name in _FLOATS:
        if name in fields:
            fields[name] = _float(name, fields[name])
    for name in ("include_stop_sequence", "ignore_eos", "logprobs"):
        if name in fields and not isinstance(fields[name], bool):
            raise TypeError(f"{name} must be a bool, got {type(fields[name]).__name__}")
    if "request_id" in fields:
        _text("request_id", fields["request_id"])
    if "stop_sequences" in fields:
        if isinstance(fields["stop_sequences"], str):
            raise TypeError("stop_sequences takes a sequence of strings; put a single one in a list")
        fields["stop_sequences"] = [_text(f"stop_sequences[{i}]", s) for i, s in enumerate(fields["stop_sequences"])]
    if "stop_token_ids" in fields:
        fields["stop_token_ids"] = _token_ids("stop_token_ids", fields["stop_token_ids"])
    if "logit_bias" in fields:
        fields["logit_bias"] = _logit_bias(fields["logit_bias"])
    _constraint(fields)
    return fields


CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")


def _constraint(fields: dict[str, Any]) -> None:
    """The structured-output option in `fields`, as the wire takes it (in place)."""
    given = [name for name in CONSTRAINTS if name in fields]
    if len(given) > 1:
        raise TypeError(f"pass at most one constraint, not {' and '.join(given)}")
    if not given:
        return
    name = given[0]
    value = fields[name]
    if name == "json_schema":
        if isinstance(value, type) and hasattr(value, "model_json_schema"):  # a pydantic model class
            value = value.model_json_schema()
        if isinstance(value, Mapping):
            value = json.dumps(value)
        fields[name] = _text(name, value)
    elif name == "json_object":
        if value is not True:
            raise TypeError("json_object takes True (any JSON object); leave it out otherwise")
    elif name == "choice":
        if isinstance(value, str):
            raise TypeError("choice takes a sequence of strings; put a single one in a list")
        fields[name] = Choices(options=[_text(f"choice[{i}]", option) for i, option in enumerate(value)])
    else:
        fields[name] = _text(name, value)


def _chat(messages: Sequence[tuple[str, str]]) -> list[ChatMessage]:
    if not messages:
        raise ValueError("messages must hold at least one (role, content) pair")
    turns = []
    for i, message in enumerate(messages):
        if not (isinstance(message, tuple | list) and len(message) == 2 and all(isinstance(m, str) for m in message)):
            raise TypeError(f"messages[{i}] must be a (role, content) tuple of strings, got {message!r}")
        turns.append(
            ChatMessage(
                role=_text(f"messages[{i}].role", message[0]), content=_text(f"messages[{i}].content", message[1])
            )
        )
    return turns


def generate_request(
    prompt: str | None,
    messages: Sequence[tuple[str, str]] | None,
    prompt_token_ids: Sequence[int] | None,
    options: GenerateOptions,
) -> GenerateRequest:
    """The GenerateRequest for `generate()`'s arguments, checked before any call.

    Unknown options are a TypeError; options left out or None stay unset on
    the wire (proto3 presence), so the server applies its defaults.
    """
    if sum(given is not None for given in (prompt, messages, prompt_token_ids)) != 1:
        raise TypeError("pass a prompt, messages or prompt_token_ids (exactly one)")
    unknown = sorted(set(options) - GenerateOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    fields = _checked(options)
    if messages is not None:
        return GenerateRequest(messages=_chat(messages), **fields)
    if prompt_token_ids is not None:
        ids = _token_ids("prompt_token_ids", prompt_token_ids)
        if not ids:  # an empty repeated field is not on the wire: a request with no input
            raise ValueError("prompt_token_ids must hold at least one token id")
        return GenerateRequest(prompt_token_ids=ids, **fields)
    return GenerateRequest(prompt=_text("prompt", prompt), **fields)


def samples_request(
    prompt: str | None,
    messages: Sequence[tuple[str, str]] | None,
    prompt_token_ids: Sequence[int] | None,
    n: int,
    options: SampleOptions,
) -> GenerateRequest:
    """The GenerateRequest for `samples()`' arguments, checked before any call (`n` is required there)."""
    if n is None:
        raise TypeError("samples() takes n, the number of samples (an int)")
    return generate_request(prompt, messages, prompt_token_ids, {**options, "n": n})


def score_request(
    prompt: str | None,
    messages: Sequence[tuple[str, str]] | None,
    prompt_token_ids: Sequence[int] | None,
    top_logprobs: int,
    truncate_input_tokens: int | None,
) -> GenerateRequest:
    """The GenerateRequest for `score()`' arguments: score the prompt, generate nothing."""
    alternatives = _unsigned("top_logprobs", top_logprobs)  # named as score() takes it
    options: GenerateOptions = {
        "max_new_tokens": 0,
        "prompt_logprobs": alternatives,
        "truncate_input_tokens": truncate_input_tokens,
    }
    return generate_request(prompt, messages, prompt_token_ids, options)


def one_sample(request: GenerateRequest) -> GenerateRequest:
    """`request`, if it asks for one completion (`complete()` returns one); TypeError otherwise."""
    if request.n is not None and request.n > 1:
        raise TypeError(f"complete() returns one completion, not n={request.n}: call samples(n=...) for several")
    return request


def _logprobs(entries: list[TokenLogprobs]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob,
            top_logprobs=tuple(TopLogprob(t.token_id, t.logprob, t.text) for t in e.top_logprobs),
            rank=e.rank,
        )
        for e in entries
    )


def to_chunk(response: GenerateResponse, request_id: str) -> Chunk:
    reason = _FINISH.get(response.finish_reason)
    return Chunk(
        text=response.token,
        token_ids=tuple(response.token_ids),
        request_id=request_id,
        finish_reason=reason,
        stop_sequence=response.stop_sequence,
        usage=None
        if reason is None
        else Usage(response.input_token_count, response.generated_token_count, response.cached_token_count),
        logprobs=_logprobs(response.logprobs),
        seed=response.seed,
        stop_token_id=response.stop_token_id,
        index=response.index,
        prompt_logprobs=_logprobs(response.prompt_logprobs),
    )


def to_completion(chunks: list[Chunk], sample: str = "the stream") -> Completion:
    """One sample's chunks as its Completion (`sample` names it in the error of a stream cut short)."""
    last = chunks[-1] if chunks else None
    if last is None or last.finish_reason is None or last.usage is None:
        raise RuntimeError(f"{sample} ended without a final message")
    return Completion(
        text="".join(c.text for c in chunks),
        token_ids=tuple(t for c in chunks for t in c.token_ids),
        finish_reason=last.finish_reason,
        usage=last.usage,
        stop_sequence=last.stop_sequence,
        request_id=last.request_id,
        logprobs=tuple(entry for c in chunks for entry in c.logprobs),
        seed=last.seed,
        stop_token_id=last.stop_token_id,
        prompt_logprobs=tuple(entry for c in chunks for entry in c.prompt_logprobs),
    )


def to_completions(chunks: list[Chunk], n: int) -> list[Completion]:
    """The interleaved chunks of `n` samples as their Completions, in index order."""
    own: list[list[Chunk]] = [[] for _ in range(n)]
    for chunk in chunks:
        if chunk.index >= n:
            raise RuntimeError(f"the stream sent sample {chunk.index}, beyond the {n} asked for")
        own[chunk.index].append(chunk)
    return [to_completion(sample, f"sample {index}") for index, sample in enumerate(own)]


def tokenize_request(text: str, truncate_input_tokens: int | None) -> TokenizeRequest:
    """The TokenizeRequest, checked before any call (TypeError, ValueError)."""
    if truncate_input_tokens is not None:
        _unsigned("truncate_input_tokens", truncate_input_tokens)
    return TokenizeRequest(text=_text("text", text), truncate_input_tokens=truncate_input_tokens)


def to_tokens(response: TokenizeResponse) -> Tokens:
    return Tokens(tuple(response.token_ids), tuple(response.pieces))


def to_model_info(response: GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_id=response.model_id,
        context_length=response.context_length,
        vocab_size=response.vocab_size,
        default_max_new_tokens=response.default_max_new_tokens,
        max_max_new_tokens=response.max_max_new_tokens,
        eos_token_ids=tuple(response.eos_token_ids),
        has_chat_template=response.has_chat_template,
        engine=response.engine,
        constraint_kinds=tuple(response.constraint_kinds),
    )
