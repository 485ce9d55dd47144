"""Health follows the real batching engine: a dead batching thread turns it NOT_SERVING, and so does a stuck one."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_client import LLMClient, LLMError, UnavailableError
from entity_llm_server import LLMService

from ..conftest import wait_until
from ..engines import batching_engine, held_forward, slow_forward

pytestmark = pytest.mark.model

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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


def test_a_stuck_batching_step_turns_health_not_serving_and_refuses_requests_until_it_steps_again(serve):
    engine = batching_engine(max_batch_size=4, max_queue=4)
    server = serve(LLMService(engine=engine), health_check_interval=0.05).start()
    with LLMClient(server.target, timeout=60) as client, grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        expected = client.complete("def f(x):", max_new_tokens=6).text  # loads and starts the engine
        engine.batching.pulse.timeout = 0.5
        gate = threading.Event()
        held_forward(engine, gate)
        result: list[str] = []
        waiting = threading.Thread(target=lambda: result.append(client.complete("def f(x):", max_new_tokens=6).text))
        waiting.start()
        assert wait_until(lambda: engine.stalled, timeout=10)  # holds a request, runs no step
        assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status == NOT_SERVING)
        with pytest.raises(UnavailableError, match=r"no step for 0\.5 s while holding requests \(stuck\)"):
            client.complete("import os\n", max_new_tokens=2)
        gate.set()  # the step returns
        waiting.join(60)
        assert result == [expected]  # the held request lost nothing
        assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status == SERVING)
        assert client.complete("def f(x):", max_new_tokens=6).text == expected
