"""grpc.health.v1 follows the engine (not ready, ready, failed) and the drain; Watch streams see each change."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_client import LLMClient
from entity_llm_server import LLMService
from entity_llm_server.testing import FakeEngine

from ..conftest import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = ("", "entity.grpc.LLMService")


class BreakableEngine(FakeEngine):
    """A fake engine whose `healthy` can be turned off, as a batching thread that died turns it off."""

    broken = False
    stalled = False  # as an engine process that does not answer pings (it may recover)

    @property
    def healthy(self) -> bool:
        return self.started and not self.broken


def wait_for_status(watch, wanted: int) -> bool:
    """Read a Watch stream until it reports `wanted` (it sends only changes, so this ends)."""
    return any(response.status == wanted for response in watch)


def check(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.mark.parametrize("name", NAMES)
def test_health_follows_the_engine_without_any_llm_request(serve, name):
    engine = BreakableEngine()
    server = serve(LLMService(engine=engine), health_check_interval=0.02).start()
    assert check(server.target, name) == NOT_SERVING  # nothing loaded yet

    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=name), timeout=60)
        assert next(watch).status == NOT_SERVING
        server.call(engine.start())  # what loading and warming up the model ends with
        assert next(watch).status == SERVING
        engine.broken = True  # no RPC arrives: the watcher alone must notice
        assert next(watch).status == NOT_SERVING
        engine.broken = False
        assert next(watch).status == SERVING
        watch.cancel()
    assert check(server.target, name) == SERVING


def test_an_unknown_service_name_is_not_found(serve):
    server = serve(LLMService(engine=FakeEngine())).start()
    with pytest.raises(grpc.RpcError) as caught:
        check(server.target, "no.such.Service")
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


def test_a_drain_turns_health_not_serving_for_good_and_probes_still_get_answers(serve):
    engine = FakeEngine(delay=0.01, default_max_new_tokens=10_000)
    server = serve(LLMService(engine=engine), health_check_interval=0.02).start()
    with LLMClient(server.target, timeout=60) as client, grpc.insecure_channel(server.target) as channel:
        stream = client.generate("x")
        next(stream)  # the engine is started and a stream is in flight
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert wait_for_status(watch, SERVING)  # the watcher notices the started engine within its interval
        draining = asyncio.run_coroutine_threadsafe(server.server.stop(30), server.loop)
        assert next(watch).status == NOT_SERVING
        # Probes keep their answers while the stream drains; the engine's health cannot undo the drain.
        assert check(server.target, "entity.grpc.LLMService") == NOT_SERVING
        assert engine.healthy
        stream.close()  # the client leaves: nothing is in flight any more
        draining.result(timeout=30)


def test_only_a_failed_engine_not_a_stalled_one_counts_as_engine_failure(serve):
    # What --on-engine-failure exit ends the process on: an engine that does
    # not answer may recover, so it turns health NOT_SERVING but is no failure.
    engine = BreakableEngine()
    server = serve(LLMService(engine=engine), health_check_interval=0.02).start()
    failed = server.server.health.engine_failed
    server.call(engine.start())
    assert wait_until(lambda: check(server.target, "") == SERVING)
    engine.broken = engine.stalled = True
    assert wait_until(lambda: check(server.target, "") == NOT_SERVING)
    looked = server.server.health.looks
    assert wait_until(lambda: server.server.health.looks >= looked + 10)  # ten more looks at the stalled engine
    assert not failed.is_set()
    engine.stalled = False  # alive no more: a failure
    assert wait_until(failed.is_set)


def test_an_engine_stalled_past_the_stuck_timeout_has_failed_and_a_recovery_resets_the_clock(serve):
    engine = BreakableEngine()
    server = serve(LLMService(engine=engine), health_check_interval=0.02, engine_stuck_timeout=0.5).start()
    health = server.server.health
    server.call(engine.start())
    assert wait_until(lambda: check(server.target, "") == SERVING)
    for _ in range(3):  # stalls shorter than the timeout, each followed by a recovery: no failure
        engine.broken = engine.stalled = True
        assert wait_until(lambda: check(server.target, "") == NOT_SERVING)
        looked = health.looks
        assert wait_until(lambda looked=looked: health.looks >= looked + 3)
        engine.broken = engine.stalled = False
        assert wait_until(lambda: check(server.target, "") == SERVING)
    assert not health.engine_failed.is_set()
    engine.broken = engine.stalled = True  # stuck for good
    assert wait_until(health.engine_failed.is_set, timeout=5)
    assert engine.stalled  # still alive: it failed by the clock, not by dying
