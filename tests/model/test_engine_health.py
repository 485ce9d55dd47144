"""Health follows the real batching engine: a dead batching thread turns it NOT_SERVING."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_client import LLMClient, LLMError
from entity_llm_server import LLMService, UnifiedLLMResource
from entity_llm_server.engine import BatchingEngine, BatchingSettings

from ..conftest import wait_until

pytestmark = pytest.mark.model


def _batching(max_batch_size: int, max_queue: int) -> BatchingEngine:
    settings = BatchingSettings(max_batch_size=max_batch_size, max_queue=max_queue)
    engine = UnifiedLLMResource(default_max_new_tokens=16, batching=settings).load_engine()
    assert isinstance(engine, BatchingEngine)
    return engine


def _slow_forward(engine: BatchingEngine, seconds: float, fail_after: int | None = None) -> None:
    model, forward, calls = engine.model, engine.model.forward, [0]

    def slow(*args, **kwargs):
        calls[0] += 1
        if fail_after is not None and calls[0] > fail_after:
            raise RuntimeError("CUDA out of memory (injected)")
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow


def test_a_dead_batching_thread_turns_health_not_serving_without_another_request(serve):
    engine = _batching(max_batch_size=4, max_queue=4)
    server = serve(LLMService(engine=engine), health_check_interval=0.05).start()
    with LLMClient(server.target, timeout=60) as client, grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # not loaded yet
        assert client.complete("import os\n").text  # loads and starts the engine
        statuses = iter(watch)
        assert next(s.status for s in statuses if s.status == health_pb2.HealthCheckResponse.SERVING)
        _slow_forward(engine, 0.005, fail_after=5)
        with pytest.raises(LLMError) as caught:
            client.complete("def f(x):")
        assert caught.value.code is grpc.StatusCode.INTERNAL
        # The failed request was the last one: the watcher alone reports the dead engine.
        assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert wait_until(lambda: not engine.healthy)
