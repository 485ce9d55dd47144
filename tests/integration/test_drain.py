"""The drain: new RPCs get UNAVAILABLE "server is shutting down" while in-flight streams finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_client import FinishReason, LLMClient, LLMError, UnavailableError
from entity_llm_server import LLMService
from entity_llm_server.engine import EngineEvent, EngineRequest
from entity_llm_server.testing import FakeEngine

from ..conftest import wait_until
from .test_health import NOT_SERVING, SERVING, wait_for_status

PIECES = ("a", "b", "c", "d")


class HeldEngine(FakeEngine):
    """Streams the first piece of each request, then waits for `release` before the rest."""

    def __init__(self) -> None:
        super().__init__(PIECES)
        self.release = asyncio.Event()

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        first = True
        async for event in super().generate(request):
            yield event
            if first:
                first = False
                await self.release.wait()


def test_a_drain_refuses_new_rpcs_and_lets_the_stream_in_flight_finish(serve):
    engine = HeldEngine()
    server = serve(LLMService(engine=engine), health_check_interval=0.02).start()
    with LLMClient(server.target, timeout=60) as client, grpc.insecure_channel(server.target) as channel:
        first = client.generate("x")
        assert next(first).text == "a"  # in flight, held by the engine
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert wait_for_status(watch, SERVING)

        draining = asyncio.run_coroutine_threadsafe(server.server.stop(60), server.loop)
        assert next(watch).status == NOT_SERVING  # health goes first
        with pytest.raises(UnavailableError) as refused:
            list(client.generate("y"))
        assert refused.value.details == "server is shutting down"
        with pytest.raises(UnavailableError, match="server is shutting down"):
            client.tokenize("y")
        assert not draining.done()

        server.loop.call_soon_threadsafe(engine.release.set)
        rest = list(first)
        draining.result(timeout=30)
    assert [c.text for c in rest] == ["b", "c", "d", ""]
    assert rest[-1].finish_reason is FinishReason.MAX_TOKENS
    assert server.server.gate.in_flight == 0


def test_a_stream_still_running_when_the_grace_period_ends_is_cancelled(serve):
    engine = HeldEngine()  # never released
    server = serve(LLMService(engine=engine)).start()
    with LLMClient(server.target, timeout=60) as client:
        stream = client.generate("x")
        next(stream)
        asyncio.run_coroutine_threadsafe(server.server.stop(0.2), server.loop).result(timeout=30)
        with pytest.raises(LLMError) as ended:
            list(stream)
    # grpcio reports the cut as UNAVAILABLE or CANCELLED depending on who notices first.
    assert ended.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert wait_until(lambda: engine.active == 0)
