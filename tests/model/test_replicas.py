"""Engine replicas (`--engine-replicas N`): several engine processes behind one front end."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_client import LLMClient
from entity_llm_server import EngineRequest, LLMService, UnifiedLLMResource, parse_config
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingSettings, Finished
from entity_llm_server.engine.process import ProcessEngine

from ..conftest import wait_until
from .test_batching import PROMPTS

pytestmark = pytest.mark.model


def replicated(replicas: int, max_batch_size: int = 8, max_queue: int = 32) -> ProcessEngine:
    settings = BatchingSettings(max_batch_size=max_batch_size, max_queue=max_queue)
    resource = UnifiedLLMResource(
        default_max_new_tokens=16, batching=settings, engine_process=True, engine_replicas=replicas
    )
    engine = resource.load_engine()
    assert isinstance(engine, ProcessEngine)
    assert len(engine.children) == replicas
    return engine


async def _greedy(engine: ProcessEngine) -> tuple[list[tuple[int, ...]], list[int]]:
    await engine.start()
    try:

        async def one(i: int) -> tuple[int, ...]:
            events = [e async for e in engine.generate(EngineRequest(f"{PROMPTS[i % len(PROMPTS)]}{i}"))]
            assert isinstance(events[-1], Finished)
            return events[-1].token_ids

        together = await asyncio.gather(*(one(i) for i in range(16)))
        steps = [(await asyncio.to_thread(core.state)).steps for core in engine.processes]
        return list(together), steps
    finally:
        await engine.close()


def test_two_replicas_stream_what_one_does_and_share_the_work():
    two, steps = asyncio.run(_greedy(replicated(2)))
    one, _ = asyncio.run(_greedy(replicated(1)))
    assert two == one
    assert all(one)
    assert all(count > 0 for count in steps), steps  # both replicas decoded


def test_a_killed_replica_fails_only_its_own_streams_and_the_rest_serve_on(serve):
    engine = replicated(2, max_batch_size=4, max_queue=4)
    server = serve(LLMService(engine=engine), health_check_interval=0.05).start()
    server.call(server.service.engine(), timeout=120)
    long = llm_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=300, min_new_tokens=300)

    async def main() -> list[tuple[grpc.StatusCode, str, int]]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)

            async def one() -> tuple[grpc.StatusCode, str, int]:
                tokens = 0
                try:
                    async for message in stub.Generate(long, timeout=120):
                        tokens += len(message.token_ids)
                except grpc.aio.AioRpcError as error:
                    return error.code(), error.details() or "", tokens
                return grpc.StatusCode.OK, "", tokens

            streams = [asyncio.ensure_future(one()) for _ in range(8)]
            # Least loaded first: four streams on each replica.
            held = await asyncio.to_thread(
                wait_until, lambda: [core.state().held for core in engine.processes] == [4, 4], 60
            )
            assert held, [core.state().held for core in engine.processes]
            os.kill(engine.children[1].popen.pid, signal.SIGKILL)
            return await asyncio.gather(*streams)

    ends = asyncio.run(main())
    failed = [e for e in ends if e[0] is not grpc.StatusCode.OK]
    assert len(failed) == 4
    assert all(code is grpc.StatusCode.INTERNAL and "engine replica 1" in details for code, details, _ in failed)
    assert sorted(n for code, _, n in ends if code is grpc.StatusCode.OK) == [300] * 4
    assert engine.healthy
    # Metrics carry each replica: the dead one is down and holds nothing.
    registry = server.server.metrics.registry
    assert [registry.get_sample_value("entity_llm_core_up", {"core": c}) for c in "01"] == [1.0, 0.0]
    assert registry.get_sample_value("entity_llm_core_requests", {"core": "1"}) == 0.0
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="entity.grpc.LLMService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with LLMClient(server.target, timeout=60) as client:
        for _ in range(20):
            assert client.complete("import os\n", max_new_tokens=4).usage.generated_tokens == 4
    server.call(engine.close(), timeout=120)


def test_replicas_need_engine_processes():
    with pytest.raises(SystemExit):
        parse_config(["--engine-replicas", "2", "--engine-process", "off"])
    with pytest.raises(SystemExit):
        parse_config(["--engine-replicas", "2", "--device", "cuda:0,cuda:1,cuda:2"])
    assert parse_config(["--engine-replicas", "2", "--device", "cuda:0,cuda:1"]).engine_replicas == 2
    with pytest.raises(ValueError, match="engine process"):
        UnifiedLLMResource(engine_replicas=2)
