"""gRPC's retry policy: UNAVAILABLE before the first response is retried; after it, never."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from entity_llm_client import AsyncLLMClient, InvalidArgumentError, LLMClient, UnavailableError
from entity_llm_server._gen.entity.grpc import llm_pb2

from .capturing import REPLY, CapturingServicer, Context, running


class FailsFirstAttempt(CapturingServicer):
    """The first Generate and the first Tokenize fail with `code` before any response."""

    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__()
        self.code = code
        self.previous_attempts: list[str | None] = []
        self.tokenize_attempts = 0

    async def reply(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        metadata = dict(context.invocation_metadata() or ())
        self.previous_attempts.append(metadata.get("grpc-previous-rpc-attempts"))  # type: ignore[arg-type]
        if self.attempts == 1:
            await context.abort(self.code, "not now")
        async for response in super().reply(request, context):
            yield response

    async def Tokenize(self, request: llm_pb2.TokenizeRequest, context: Context) -> llm_pb2.TokenizeResponse:  # noqa: N802
        self.tokenize_attempts += 1
        if self.tokenize_attempts == 1:
            await context.abort(self.code, "not now")
        return await super().Tokenize(request, context)


class FailsAfterFirstToken(CapturingServicer):
    async def reply(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        yield REPLY[0]
        await context.abort(grpc.StatusCode.UNAVAILABLE, "lost the model")


def test_a_stream_that_fails_before_its_first_token_is_retried():
    servicer = FailsFirstAttempt()
    with running(servicer) as target, LLMClient(target, timeout=30) as client:
        done = client.complete("x")
        tokens = client.tokenize("x")
    assert done.text == "Hello"
    assert servicer.attempts == 2
    assert servicer.previous_attempts == [None, "1"]  # gRPC's own retry, as the server sees it
    assert (tokens.ids, servicer.tokenize_attempts) == ((5,), 2)


def test_the_async_client_retries_too():
    servicer = FailsFirstAttempt()

    async def run() -> str:
        async with AsyncLLMClient(target, timeout=30) as client:
            return "".join([chunk.text async for chunk in client.generate("x")])

    with running(servicer) as target:
        assert asyncio.run(run()) == "Hello"
    assert servicer.attempts == 2


def test_retries_false_turns_them_off():
    servicer = FailsFirstAttempt()
    with running(servicer) as target, LLMClient(target, timeout=30, retries=False) as client:
        with pytest.raises(UnavailableError, match="not now"):
            client.complete("x")
        with pytest.raises(UnavailableError):
            client.tokenize("x")
    assert (servicer.attempts, servicer.tokenize_attempts) == (1, 1)


def test_a_stream_that_fails_after_its_first_token_is_not_retried():
    servicer = FailsAfterFirstToken()
    with running(servicer) as target, LLMClient(target, timeout=30) as client:
        stream = client.generate("x")
        assert next(stream).text == "He"
        with pytest.raises(UnavailableError, match="lost the model"):
            next(stream)
    assert servicer.attempts == 1


def test_other_codes_are_not_retried():
    servicer = FailsFirstAttempt(grpc.StatusCode.INVALID_ARGUMENT)
    with running(servicer) as target, LLMClient(target, timeout=30) as client, pytest.raises(InvalidArgumentError):
        client.complete("x")
    assert servicer.attempts == 1
