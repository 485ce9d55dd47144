"""Health follows the real batching engine: a dead batching thread turns it NOT_SERVING."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_client import LLMClient, LLMError
from entity_llm_server import LLMService

from ..conftest import wait_until
from ..engines import batching_engine, slow_forward

pytestmark = pytest.mark.model


def test_a_dead_batching_thread_turns_health_not_serving_without_another_request(serve):
    engine = batching_engine(max_batch_size=4, max_queue=4)
    server = serve(LLMService(engine=engine), health_check_interval=0.05).start()
    with LLMClient(server.target, timeout=60) as client, grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # not loaded yet
        assert client.complete("import os\n").text  # loads and starts the engine
        statuses = iter(watch)
        assert next(s.status for s in statuses if s.status == health_pb2.HealthCheckResponse.SERVING)
        slow_forward(engine, 0.005, fail_after=5)
        with pytest.raises(LLMError) as caught:
            client.complete("def f(x):")
        assert caught.value.code is grpc.StatusCode.INTERNAL
        # The failed request was the last one: the watcher alone reports the dead engine.
        assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert wait_until(lambda: not engine.healthy)
