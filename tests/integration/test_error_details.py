"""INVALID_ARGUMENT from the real server carries field violations the SDK exposes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from entity_llm_client import AsyncLLMClient, FieldViolation, InvalidArgumentError, LLMClient
from entity_llm_server import LLMService
from entity_llm_server.testing import FakeEngine

PIECES = ("a", "b")


def test_too_many_stop_sequences_names_the_field(serve):
    server = serve(LLMService(engine=FakeEngine(PIECES))).start()
    with LLMClient(server.target, timeout=10) as client, pytest.raises(InvalidArgumentError) as caught:
        client.complete("x", stop_sequences=[f"s{i}" for i in range(7)])
    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == ["stop_sequences"]
    assert "7" in error.field_violations[0].description
    assert all(isinstance(v, FieldViolation) for v in error.field_violations)


def test_every_violation_arrives_in_order_on_the_async_client(serve):
    server = serve(LLMService(engine=FakeEngine(PIECES))).start()

    async def run() -> InvalidArgumentError:
        async with AsyncLLMClient(server.target, timeout=10) as client:
            with pytest.raises(InvalidArgumentError) as caught:
                await client.complete("x", stop_sequences=["ok", ""], max_new_tokens=0)
            return caught.value

    error = asyncio.run(run())
    assert [v.field for v in error.field_violations] == ["max_new_tokens", "stop_sequences[1]"]
    assert error.field_violations[1] == FieldViolation("stop_sequences[1]", "must not be empty")


def test_tokenize_violations_are_parsed_too(serve):
    server = serve(LLMService(engine=FakeEngine(PIECES))).start()
    with LLMClient(server.target, timeout=10) as client, pytest.raises(InvalidArgumentError) as caught:
        client.tokenize("x", truncate_input_tokens=0)
    assert [v.field for v in caught.value.field_violations] == ["truncate_input_tokens"]
