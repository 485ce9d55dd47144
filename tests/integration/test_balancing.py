"""One client over several servers: gRPC's round_robin, health checking and retries, with the server's
part of the bargain (no response headers before a call is accepted)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from entity_llm_client import LLMClient, UnavailableError
from entity_llm_client._connection import channel_options
from entity_llm_server import LLMService
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import EngineEvent, EngineOverloadedError, EngineRequest
from entity_llm_server.testing import FakeEngine

from ..conftest import ServerThread, shared_port, wait_until

HOSTS = ("127.0.0.2", "127.0.0.3")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GENERATE = "/entity.grpc.LLMService/Generate"


class Full(FakeEngine):
    """Refuses every request, as an engine at capacity does."""

    refused = 0

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        self.refused += 1
        raise EngineOverloadedError("server at capacity")
        yield  # an async generator, like every engine's generate


def _pair(serve, *engines: FakeEngine) -> tuple[list[ServerThread], list[str]]:
    """Servers on 127.0.0.2 and 127.0.0.3 with one port (as pods), each engine started."""
    port = shared_port(HOSTS)
    servers = []
    for host, engine in zip(HOSTS, engines, strict=True):
        server = serve(LLMService(engine=engine), address=f"{host}:{port}", health_check_interval=0.05).start()
        server.call(engine.start())
        servers.append(server)
    return servers, [f"{host}:{port}" for host in HOSTS]


def test_a_full_servers_refusals_are_retried_on_the_other(serve):
    full = Full()
    _, addresses = _pair(serve, FakeEngine(), full)
    with LLMClient(addresses, timeout=10) as client:
        done = [client.complete("x") for _ in range(20)]
    assert [c.text for c in done] == ["Hello, world!"] * 20
    assert full.refused >= 9  # round_robin sent it its share, and each refusal went on


def test_a_full_server_is_not_retried_without_balancing(serve):
    servers, _ = _pair(serve, Full(), FakeEngine())
    with LLMClient(servers[0].target, timeout=10) as client, pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
        client.complete("x")


@pytest.mark.parametrize("request_id", [None, "rid-7"])
def test_a_draining_servers_refusal_is_retried_even_when_the_caller_sent_a_request_id(serve, request_id):
    servers, addresses = _pair(serve, FakeEngine(), FakeEngine())
    servers[1].server.gate.close()  # refuses new calls; its health still says SERVING
    metadata = [("x-request-id", request_id)] if request_id else []
    options = channel_options([], balancing=True, health_checks=False)
    with grpc.insecure_channel(f"ipv4:{','.join(addresses)}", options=options) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        for _ in range(10):
            call = stub.Generate(llm_pb2.GenerateRequest(prompt="x"), metadata=metadata, timeout=10)
            assert "".join(r.token for r in call) == "Hello, world!"
            # The header is echoed by the server that took the call.
            assert dict(call.initial_metadata()).get("x-request-id") == request_id
    refused = servers[1].server.metrics.registry.get_sample_value(
        "entity_llm_requests_total", {"method": GENERATE, "code": "UNAVAILABLE"}
    )
    assert refused is not None
    assert refused >= 4


def test_a_refused_call_gets_no_response_headers_so_it_stays_retryable(serve):
    server = serve(LLMService(engine=FakeEngine())).start()
    server.server.gate.close()
    with grpc.insecure_channel(server.target, options=[("grpc.enable_retries", 0)]) as channel:
        call = llm_pb2_grpc.LLMServiceStub(channel).Generate(
            llm_pb2.GenerateRequest(prompt="x"), metadata=[("x-request-id", "late-1")], timeout=10
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert dict(refused.value.initial_metadata() or ()) == {}  # a trailers-only answer: nothing committed


def test_no_healthy_server_is_unavailable_within_the_deadline_naming_the_cause(serve):
    engines = (FakeEngine(), FakeEngine())
    servers, addresses = _pair(serve, *engines)
    for server, engine in zip(servers, engines, strict=True):
        server.call(engine.close())  # the engine stops: health turns NOT_SERVING
        assert wait_until(lambda server=server: server.server.health.status == NOT_SERVING)
    with LLMClient(addresses, timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="no replica was healthy") as failed:
            client.complete("x")
        assert time.monotonic() - started < 5
    assert "unhealthy" in failed.value.details
