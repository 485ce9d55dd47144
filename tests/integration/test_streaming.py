"""A real grpc.aio server on a fake engine, streamed by the sync and async SDK clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc
import pytest

from entity_llm_client import AsyncLLMClient, Chunk, FinishReason, LLMClient, LLMError, UnavailableError, Usage
from entity_llm_server import LLMService
from entity_llm_server.engine import EngineError, EngineEvent, EngineRequest
from entity_llm_server.testing import FakeEngine

from ..conftest import wait_until

PIECES = ("def", " fib", "(n", "):", "\n", "    return", " n")


def test_sync_client_streams_every_piece_in_order(serve):
    server = serve(LLMService(engine=FakeEngine(PIECES))).start()
    with LLMClient(server.target, timeout=10) as client:
        chunks = list(client.generate("def fibonacci(n):"))
    assert all(isinstance(chunk, Chunk) for chunk in chunks)
    assert [chunk.text for chunk in chunks[:-1]] == list(PIECES)
    assert "".join(map(str, chunks)) == "".join(PIECES)
    final = chunks[-1]
    assert (final.text, final.finish_reason) == ("", FinishReason.MAX_TOKENS)
    assert final.usage == Usage(input_tokens=2, generated_tokens=len(PIECES))
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert len({c.request_id for c in chunks}) == 1
    assert chunks[0].request_id


def test_async_client_streams_every_piece_in_order(serve):
    server = serve(LLMService(engine=FakeEngine(PIECES))).start()

    async def run() -> list[str]:
        async with AsyncLLMClient(server.target, timeout=10) as client:
            return [chunk.text async for chunk in client.generate("x", request_id="mine")]

    assert asyncio.run(run()) == [*PIECES, ""]


def test_many_concurrent_async_streams_each_get_the_whole_stream(serve):
    engine = FakeEngine(PIECES, delay=0.001, default_max_new_tokens=50)
    server = serve(LLMService(engine=engine)).start()

    async def run() -> list[list[str]]:
        async with AsyncLLMClient(server.target, timeout=30) as client:

            async def one() -> list[str]:
                return [chunk.text async for chunk in client.generate("x")]

            return await asyncio.gather(*(one() for _ in range(32)))

    results = asyncio.run(run())
    expected = [*(PIECES[i % len(PIECES)] for i in range(50)), ""]
    assert results == [expected] * 32


def test_leaving_a_sync_stream_early_frees_the_engine(serve):
    engine = FakeEngine(PIECES, delay=0.01, default_max_new_tokens=10_000)
    server = serve(LLMService(engine=engine)).start()
    with LLMClient(server.target) as client:
        stream = client.generate("x")
        assert next(stream).text == PIECES[0]
        assert engine.active == 1
        stream.close()  # what a `break` out of the for loop does
        assert wait_until(lambda: engine.active == 0)


def test_leaving_an_async_stream_early_frees_the_engine(serve):
    engine = FakeEngine(PIECES, delay=0.01, default_max_new_tokens=10_000)
    server = serve(LLMService(engine=engine)).start()

    async def run() -> None:
        async with AsyncLLMClient(server.target) as client:
            stream = client.generate("x")
            async for _ in stream:
                break
            await stream.aclose()

    asyncio.run(run())
    assert wait_until(lambda: engine.active == 0)


class _FailingEngine(FakeEngine):
    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        async for event in super().generate(request):
            yield event
            raise EngineError("the decode thread died")


def test_an_engine_failure_is_an_internal_error_not_ok(serve):
    server = serve(LLMService(engine=_FailingEngine(PIECES))).start()
    with LLMClient(server.target, timeout=10) as client, pytest.raises(LLMError) as caught:
        list(client.generate("x"))
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert "decode thread died" in caught.value.details


def test_an_unreachable_server_raises_unavailable():
    with LLMClient("127.0.0.1:1", timeout=5) as client, pytest.raises(UnavailableError) as caught:
        list(client.generate("x"))
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_a_deadline_is_translated_and_frees_the_engine(serve):
    engine = FakeEngine(PIECES, delay=0.05, default_max_new_tokens=10_000)
    server = serve(LLMService(engine=engine)).start()
    with LLMClient(server.target, timeout=0.3) as client, pytest.raises(LLMError) as caught:
        list(client.generate("x"))
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: engine.active == 0)
