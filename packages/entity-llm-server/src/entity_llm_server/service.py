"""LLMService: translates protobuf <-> engine types, nothing else."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from ._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from .engine import (
    Engine,
    EngineRequest,
    EngineUnavailableError,
    Finished,
    FinishReason,
    InvalidRequestError,
    Sampling,
    Scored,
    TokenLogprob,
)
from .engine.constraints import Constraint
from .engine.text import sized_call
from .errors import error_boundary
from .resource import UnifiedLLMResource
from .validation import MAX_MESSAGE_BYTES, validate_generate, validate_tokenize

RESTARTING = "the engine has failed and is being loaded again (--on-engine-failure restart); try again shortly"

_FINISH_REASONS = {
    FinishReason.MAX_TOKENS: llm_pb2.FINISH_REASON_MAX_TOKENS,
    FinishReason.EOS: llm_pb2.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: llm_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.TIME_LIMIT: llm_pb2.FINISH_REASON_TIME_LIMIT,
    FinishReason.TOKEN_LIMIT: llm_pb2.FINISH_REASON_TOKEN_LIMIT,
    FinishReason.STOP_TOKEN: llm_pb2.FINISH_REASON_STOP_TOKEN,
}


def _optional(message: Any, field: str, default: Any = None) -> Any:
    """A proto3 `optional` field's value, or `default` when it was not sent."""
    return getattr(message, field) if message.HasField(field) else default


def _constraint(request: llm_pb2.GenerateRequest) -> Constraint | None:
    which = request.WhichOneof("constraint")
    if which is None:
        return None
    if which == "choice":
        return Constraint("choice", json.dumps(list(request.choice.options)))
    if which == "json_object":
        return Constraint("json_object")
    return Constraint(which, getattr(request, which))


def engine_request(request: llm_pb2.GenerateRequest, request_id: str) -> EngineRequest:
    """The engine's view of a GenerateRequest (validated already)."""
    sampling = Sampling(
        temperature=_optional(request, "temperature", 0.0),
        top_p=_optional(request, "top_p", 1.0),
        top_k=_optional(request, "top_k", 0),
        repetition_penalty=_optional(request, "repetition_penalty", 1.0),
        min_new_tokens=_optional(request, "min_new_tokens", 0),
        seed=_optional(request, "seed"),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        constraint=_constraint(request),
        min_p=_optional(request, "min_p", 0.0),
        typical_p=_optional(request, "typical_p", 1.0),
        presence_penalty=_optional(request, "presence_penalty", 0.0),
        frequency_penalty=_optional(request, "frequency_penalty", 0.0),
        logit_bias=tuple(sorted(request.logit_bias.items())),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        prompt_logprobs=_optional(request, "prompt_logprobs"),
    )
    return EngineRequest(
        prompt=request.prompt,
        max_new_tokens=_optional(request, "max_new_tokens"),
        request_id=request_id,
        stop_sequences=tuple(request.stop_sequences),
        include_stop_sequence=request.include_stop_sequence,
        truncate_input_tokens=_optional(request, "truncate_input_tokens"),
        time_limit_ms=_optional(request, "time_limit_ms"),
        sampling=sampling,
        messages=tuple((m.role, m.content) for m in request.messages),
        prompt_token_ids=tuple(request.prompt_token_ids),
        n=_optional(request, "n", 1),
    )


def _logprobs(entries: tuple[TokenLogprob, ...]) -> list[llm_pb2.TokenLogprobs]:
    return [
        llm_pb2.TokenLogprobs(
            token_id=e.token_id,
            logprob=e.logprob,
            rank=e.rank,
            top_logprobs=[
                llm_pb2.TopLogprob(token_id=token, logprob=logprob, text=text)
                for (token, logprob), text in zip(e.top, e.top_text or [""] * len(e.top), strict=True)
            ],
        )
        for e in entries
    ]


class LLMService(llm_pb2_grpc.LLMServiceServicer):
    """The `entity.grpc.LLMService` servicer.

    Args:
        resource: where the model comes from; None serves the embedded
            default model. The model loads on the first request unless the
            server loaded it before serving (the console script does).
        engine: an already constructed engine (a fake one in transport tests);
            it takes the place of `resource`.
        restarts: a failed engine will be loaded again (the console script's
            --on-engine-failure restart): from its failure until it serves
            again, a call gets UNAVAILABLE, which a client may retry (on
            another replica), not INTERNAL.
    """

    def __init__(
        self, resource: UnifiedLLMResource | None = None, *, engine: Engine | None = None, restarts: bool = False
    ) -> None:
        if resource is not None and engine is not None:
            raise ValueError("pass a resource or an engine, not both")
        self.resource = resource if resource is not None or engine is not None else UnifiedLLMResource()
        self._engine = engine
        self.restarts = restarts
        # While `restarts.restart` stops the failed engine, backs off and loads it again.
        self.restarting = False

    @property
    def current_engine(self) -> Engine | None:
        """The engine if it exists already (for health and metrics); never loads a model."""
        if self._engine is not None:
            return self._engine
        return None if self.resource is None else self.resource.current_engine

    async def engine(self) -> Engine:
        """The started engine, loading the model on first use.

        Raises:
            EngineUnavailableError: the engine has failed and will be loaded again.
        """
        if self.restarting:  # not a load of our own: the restart's backoff holds
            raise EngineUnavailableError(RESTARTING)
        if self._engine is None:
            assert self.resource is not None
            engine = await self.resource.engine()
        else:
            await self._engine.start()
            engine = self._engine
        if self.restarts and not engine.healthy and not getattr(engine, "stalled", False):
            raise EngineUnavailableError(RESTARTING)  # failed; the restart begins at the health watcher's next look
        return engine

    async def Generate(  # noqa: N802  # the RPC's name in the protocol
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        async with error_boundary(context):
            validate_generate(request)
            engine = await self.engine()
            if (which := request.WhichOneof("constraint")) is not None and which not in engine.info().constraint_kinds:
                raise InvalidRequestError(which, "this server's engine applies no such constraint")
            request_id = request.request_id or uuid.uuid4().hex
            # aclosing: a client that leaves closes the engine's stream at once.
            first = True
            async with aclosing(engine.generate(engine_request(request, request_id))) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        yield llm_pb2.GenerateResponse(
                            token_ids=event.tail_ids,
                            finish_reason=_FINISH_REASONS[event.reason],
                            stop_sequence=event.stop_sequence,
                            input_token_count=event.input_tokens,
                            generated_token_count=event.generated_tokens,
                            request_id=request_id,
                            logprobs=_logprobs(event.tail_logprobs) if event.tail_logprobs else None,
                            seed=event.seed,
                            stop_token_id=event.stop_token_id,
                            cached_token_count=event.cached_tokens,
                            index=event.index,
                        )
                    elif isinstance(event, Scored):
                        yield llm_pb2.GenerateResponse(
                            prompt_logprobs=_logprobs(event.prompt_logprobs),
                            request_id=request_id if first else "",
                            index=event.index,
                        )
                        first = False
                    else:
                        # The id rides on the first and the last message only:
                        # repeating it on every token costs throughput.
                        yield llm_pb2.GenerateResponse(
                            token=event.text,
                            token_ids=event.token_ids,
                            request_id=request_id if first else "",
                            logprobs=_logprobs(event.logprobs) if event.logprobs else None,
                            index=event.index,
                        )
                        first = False

    async def Tokenize(  # noqa: N802  # the RPC's name in the protocol
        self, request: llm_pb2.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llm_pb2.TokenizeResponse:
        async with error_boundary(context):
            validate_tokenize(request)
            engine = await self.engine()
            truncate = _optional(request, "truncate_input_tokens")
            tokens = await sized_call(len(request.text), engine.tokenize, request.text, truncate)
            reply = llm_pb2.TokenizeResponse(token_ids=tokens.ids, pieces=tokens.pieces, token_count=len(tokens.ids))
            if (size := reply.ByteSize()) > MAX_MESSAGE_BYTES:
                raise InvalidRequestError(
                    "text",
                    f"its {len(tokens.ids):,} tokens make a {size / 2**20:.1f} MiB reply, over the "
                    f"{MAX_MESSAGE_BYTES / 2**20:g} MiB message limit; send less text or set truncate_input_tokens",
                )
        return reply

    async def GetModelInfo(  # noqa: N802  # the RPC's name in the protocol
        self, request: llm_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> llm_pb2.GetModelInfoResponse:
        async with error_boundary(context):
            info = (await self.engine()).info()
        return llm_pb2.GetModelInfoResponse(
            model_id=info.model_id,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            default_max_new_tokens=info.default_max_new_tokens,
            max_max_new_tokens=info.max_max_new_tokens,
            eos_token_ids=info.eos_token_ids,
            has_chat_template=info.has_chat_template,
            engine=info.engine,
            constraint_kinds=info.constraint_kinds,
        )
