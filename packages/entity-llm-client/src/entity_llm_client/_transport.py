"""Method handles and message conversion: betterproto2 messages on grpcio channels."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._gen.entity.grpc import (
    FinishReason as WireFinishReason,
)
from ._gen.entity.grpc import (
    GenerateRequest,
    GenerateResponse,
    GetModelInfoRequest,
    GetModelInfoResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from ._types import Chunk, Completion, FinishReason, ModelInfo, Tokens, Usage

SERVICE = "entity.grpc.LLMService"

_FINISH = {
    WireFinishReason.MAX_TOKENS: FinishReason.MAX_TOKENS,
    WireFinishReason.EOS: FinishReason.EOS,
    WireFinishReason.STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
    WireFinishReason.TIME_LIMIT: FinishReason.TIME_LIMIT,
    WireFinishReason.TOKEN_LIMIT: FinishReason.TOKEN_LIMIT,
}


class _WithMetadata:
    """A method handle that sends `metadata` (an API key) ahead of each call's own."""

    __slots__ = ("_call", "_metadata")

    def __init__(self, call: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._call = call
        self._metadata = metadata

    def __call__(self, request: Any, *, metadata: Iterable[tuple[str, str]] = (), **kwargs: Any) -> Any:
        return self._call(request, metadata=(*self._metadata, *metadata), **kwargs)


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


def generate_request(
    prompt: str,
    *,
    max_new_tokens: int | None,
    stop_sequences: Iterable[str],
    include_stop_sequence: bool,
    truncate_input_tokens: int | None,
    time_limit_ms: int | None,
    request_id: str,
) -> GenerateRequest:
    return GenerateRequest(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        stop_sequences=list(stop_sequences),
        include_stop_sequence=include_stop_sequence,
        truncate_input_tokens=truncate_input_tokens,
        time_limit_ms=time_limit_ms,
        request_id=request_id,
    )


def to_chunk(response: GenerateResponse, request_id: str) -> Chunk:
    reason = _FINISH.get(response.finish_reason)
    return Chunk(
        text=response.token,
        token_ids=tuple(response.token_ids),
        request_id=request_id,
        finish_reason=reason,
        stop_sequence=response.stop_sequence,
        usage=None if reason is None else Usage(response.input_token_count, response.generated_token_count),
    )


def to_completion(chunks: list[Chunk]) -> Completion:
    last = chunks[-1] if chunks else None
    if last is None or last.finish_reason is None or last.usage is None:
        raise RuntimeError("the stream ended without a final message")
    return Completion(
        text="".join(c.text for c in chunks),
        token_ids=tuple(t for c in chunks for t in c.token_ids),
        finish_reason=last.finish_reason,
        usage=last.usage,
        stop_sequence=last.stop_sequence,
        request_id=last.request_id,
    )


def tokenize_request(text: str, truncate_input_tokens: int | None) -> TokenizeRequest:
    return TokenizeRequest(text=text, truncate_input_tokens=truncate_input_tokens)


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
    )
