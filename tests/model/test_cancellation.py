"""A client that leaves is dropped by the engine's core within a few decode steps, on every engine.

Each test opens STREAMS streams that cannot end by themselves for far longer
than the engines module's BOUND of decode steps (`min_new_tokens` = `max_new_tokens` = LONG, more
streams than the batch holds), waits until the engine's core holds every one
of them, ends them the way a client does (a cancel, a closed channel, a
deadline, a SIGKILLed process), and then reads the core's own state: every
request gone within BOUND decode steps. Nothing here is timed: the core's
step counter is the clock, and wall-clock waits are only hang guards.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import grpc
import pytest

from entity_llm_server import LLMService
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import CoreState, FrontEnd

from ..conftest import ROOT, ServerThread
from ..engines import ENGINE_KINDS, assert_dropped_within_bound, load_engine, wait_for_core

pytestmark = pytest.mark.model

STREAMS = 12
BATCH = 4  # STREAMS / BATCH waves of LONG steps each: 1,500 steps to finish unaided
LONG = 500  # every stream's exact length (the demo model's context is 512)
HANG_GUARD = 120.0  # seconds: only so that a broken engine fails instead of hanging


@pytest.fixture(params=ENGINE_KINDS)
def served(request: pytest.FixtureRequest, serve) -> Iterator[tuple[ServerThread, FrontEnd]]:
    """A server on the engine `request.param`, started, sized for STREAMS long requests."""
    engine = load_engine(request.param, max_batch_size=BATCH, max_queue=STREAMS, max_new_tokens=LONG)
    server = serve(LLMService(engine=engine)).start()
    server.call(server.service.engine(), timeout=HANG_GUARD)
    yield server, engine
    server.call(engine.close(), timeout=HANG_GUARD)


def long_request(i: int) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(prompt=f"def f{i}(x):", max_new_tokens=LONG, min_new_tokens=LONG)


def test_cancelled_streams_leave_the_core_within_a_few_steps(served):
    server, engine = served

    async def main() -> CoreState:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            calls = [stub.Generate(long_request(i), timeout=HANG_GUARD) for i in range(STREAMS)]
            full = await asyncio.to_thread(wait_for_core, engine, lambda held: held == STREAMS)
            for call in calls:
                call.cancel()
            for call in calls:
                assert await call.code() is grpc.StatusCode.CANCELLED
            return full

    full = asyncio.run(main())
    assert full.held == STREAMS
    assert_dropped_within_bound(engine, full)


def test_a_closed_channel_leaves_the_core_within_a_few_steps(served):
    server, engine = served

    async def main() -> CoreState:
        channel = grpc.aio.insecure_channel(server.target)
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        calls = [stub.Generate(long_request(i), timeout=HANG_GUARD) for i in range(STREAMS)]
        full = await asyncio.to_thread(wait_for_core, engine, lambda held: held == STREAMS)
        await channel.close()  # the client goes away with every stream open
        for call in calls:
            assert await call.code() is grpc.StatusCode.CANCELLED
        return full

    assert_dropped_within_bound(engine, asyncio.run(main()))


DEADLINE = 2.0  # seconds: past the moment the core holds every stream, long before the last one could end


def test_streams_past_their_deadline_leave_the_core_within_a_few_steps(served):
    server, engine = served

    async def main() -> list[tuple[grpc.StatusCode, int]]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)

            async def one(i: int) -> tuple[grpc.StatusCode, int]:
                tokens = 0
                try:
                    async for message in stub.Generate(long_request(i), timeout=DEADLINE):
                        tokens += len(message.token_ids)
                except grpc.aio.AioRpcError as error:
                    return error.code(), tokens
                return grpc.StatusCode.OK, tokens

            streams = [asyncio.ensure_future(one(i)) for i in range(STREAMS)]
            full = await asyncio.to_thread(wait_for_core, engine, lambda held: held == STREAMS)
            assert full.held == STREAMS, "every stream reached the core before its deadline"
            return await asyncio.gather(*streams)

    ends = asyncio.run(main())
    # A stream that began decoding at once may have finished on a fast machine;
    # nothing in the queue behind them can have: at least one wave of LONG steps remains.
    assert all(code is grpc.StatusCode.DEADLINE_EXCEEDED or (code, n) == (grpc.StatusCode.OK, LONG) for code, n in ends)
    assert sum(code is grpc.StatusCode.DEADLINE_EXCEEDED for code, _ in ends) >= STREAMS - BATCH
    assert_dropped_within_bound(engine, engine.core_state())


CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    import grpc
    sys.path.insert(0, {src!r})
    from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

    async def main():
        channel = grpc.aio.insecure_channel({target!r})
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        request = llm_pb2.GenerateRequest(prompt="def main():", max_new_tokens={long}, min_new_tokens={long})
        calls = [stub.Generate(request) for _ in range({streams})]
        await channel.channel_ready()
        print("streaming", flush=True)
        await asyncio.gather(*(call.code() for call in calls))

    asyncio.run(main())
    """
)


def test_a_sigkilled_client_leaves_the_core_within_a_few_steps(served):
    server, engine = served
    src = str(ROOT / "packages" / "entity-llm-server" / "src")
    script = CLIENT.format(src=src, target=server.target, long=LONG, streams=STREAMS)
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "streaming"
        full = wait_for_core(engine, lambda held: held == STREAMS)
        client.kill()  # SIGKILL: no goodbye on the connection
        client.wait(timeout=HANG_GUARD)
    finally:
        if client.poll() is None:
            client.kill()
        if client.stdout is not None:
            client.stdout.close()
    assert_dropped_within_bound(engine, full)
