"""The installed `entity-llm-server` run as an operator runs it: drain and health."""

from __future__ import annotations

import queue
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from entity_llm_client import FinishReason, LLMClient, UnavailableError

from .conftest import RunningServer, console_script

pytestmark = pytest.mark.e2e

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_sigterm_drains_refuses_new_streams_finishes_the_open_one_and_exits_zero():
    with (
        RunningServer("--max-new-tokens", "480", "--shutdown-grace", "60") as server,
        LLMClient(server.target, timeout=120) as client,
        grpc.insecure_channel(server.target) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == SERVING  # loaded and warmed before the port was announced
        first = client.generate("class Parser:")
        assert next(first).text

        # A reflection stream left open, as a grpcurl session might: it is in
        # flight too, so the drain is certainly still waiting when the second
        # stream arrives, however fast the first one finishes.
        asks: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        holder = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(asks.get, None), timeout=120
        )
        asks.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        assert next(holder).list_services_response.service

        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # health goes first
        with pytest.raises(UnavailableError) as refused:
            list(client.generate("def second():"))
        assert refused.value.details == "server is shutting down"

        rest = list(first)
        assert rest[-1].finish_reason is FinishReason.MAX_TOKENS
        assert rest[-1].usage is not None
        assert rest[-1].usage.generated_tokens == 480
        asks.put(None)  # the reflection client half-closes: nothing is in flight any more
        assert list(holder) == []
        assert server.process.wait(timeout=60) == 0, server.stderr()
        log = server.stderr()
    assert "draining: 2 RPCs in flight" in log
    assert "code=UNAVAILABLE" in log
    assert "entity-llm-server stopped" in log


def test_help_documents_the_operations_flags():
    out = subprocess.run([console_script("entity-llm-server"), "--help"], capture_output=True, text=True, timeout=60)
    for flag in ("--metrics-port", "--health-check-interval", "--log-format"):
        assert flag in out.stdout
