"""Faults: clients that cancel, clients killed mid-stream, an engine that dies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_server import LLMService
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingEngine, CoreState

from ..conftest import ROOT, ServerThread, wait_until
from ..engines import assert_dropped_within_bound, batching_engine, slow_forward, wait_for_core
from .conftest import record, size

LONG = 256  # every request's exact length (min_new_tokens): none ends by itself before it is cancelled


def engine(max_batch_size: int = 16, max_queue: int = 48) -> BatchingEngine:
    return batching_engine(max_batch_size, max_queue, max_new_tokens=LONG)


@pytest.fixture
def served():
    started: list[ServerThread] = []

    def start(built: BatchingEngine) -> ServerThread:
        server = ServerThread(LLMService(engine=built)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_mid_stream_cancels_leave_nothing_in_the_engine(served):
    built = engine()
    server = served(built)
    total = size(300, 1_000)
    long = llm_pb2.GenerateRequest(prompt="class C:", max_new_tokens=LONG, min_new_tokens=LONG)

    async def cancel_after_first_message(stub: llm_pb2_grpc.LLMServiceStub) -> None:
        call = stub.Generate(long, timeout=60)
        async for _ in call:
            call.cancel()
            break

    async def main() -> CoreState:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            # Waves of 32 on 16 batch slots: each wave's second half waits for the first to leave.
            for _ in range(0, total, 32):
                await asyncio.gather(*(cancel_after_first_message(stub) for _ in range(32)))
            return await asyncio.to_thread(built.core_state)

    started = time.perf_counter()
    last = asyncio.run(main())
    assert_dropped_within_bound(built, last)
    record("faults: mid-stream cancels", total)
    record("faults: cancels/s", round(total / (time.perf_counter() - started), 1))
    record("faults: decode steps for all of them", built.core_state().steps)

    async def normal() -> list[llm_pb2.GenerateResponse]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            return [m async for m in stub.Generate(llm_pb2.GenerateRequest(prompt="x", max_new_tokens=8))]

    assert asyncio.run(normal())[-1].generated_token_count == 8
    assert built.in_flight == 0


CLIENT = textwrap.dedent(
    """
    import sys
    import grpc
    sys.path.insert(0, {src!r})
    from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

    channel = grpc.insecure_channel({target!r})
    stub = llm_pb2_grpc.LLMServiceStub(channel)
    request = llm_pb2.GenerateRequest(prompt="def main():", max_new_tokens={long}, min_new_tokens={long})
    for message in stub.Generate(request):
        print("token", flush=True)
    """
)


def test_a_client_killed_mid_stream_frees_its_request(served):
    built = engine()
    server = served(built)
    src = str(ROOT / "packages" / "entity-llm-server" / "src")
    script = CLIENT.format(src=src, target=server.target, long=LONG)
    clients = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for client in clients:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "token"  # streaming has begun
        before = wait_for_core(built, lambda held: held == 4)
        for client in clients:
            client.kill()  # SIGKILL: no goodbye on the connection
            client.wait(timeout=10)
        freed = time.perf_counter()
        assert_dropped_within_bound(built, before)
        record(
            "faults: seconds from SIGKILL of 4 clients to their requests freed", round(time.perf_counter() - freed, 2)
        )
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
            if client.stdout is not None:
                client.stdout.close()
    assert wait_until(lambda: built.in_flight == 0, timeout=60)


def test_an_engine_fault_ends_every_stream_with_internal_never_a_hang(served):
    built = engine(max_batch_size=4, max_queue=4)
    slow_forward(built, 0.01, fail_after=40)
    server = served(built)

    async def main() -> list[tuple[grpc.StatusCode, str]]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)

            async def one(i: int) -> tuple[grpc.StatusCode, str]:
                try:
                    async for _ in stub.Generate(
                        llm_pb2.GenerateRequest(prompt=f"x{i}", max_new_tokens=200), timeout=60
                    ):
                        pass
                except grpc.aio.AioRpcError as error:
                    return error.code(), error.details() or ""
                return grpc.StatusCode.OK, ""

            during = await asyncio.gather(*(one(i) for i in range(8)))
            after = await one(99)
            return [*during, after]

    ends = asyncio.run(main())
    assert [code for code, _ in ends] == [grpc.StatusCode.INTERNAL] * 9
    assert all("out of memory" in details for _, details in ends)
    assert built.healthy is False
    # And the health service says so, for the load balancer to stop sending traffic.
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service="entity.grpc.LLMService"), timeout=5).status

        assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
