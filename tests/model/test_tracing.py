"""OpenTelemetry: one trace from the client's span through the server's RPC span to the phases of
the generation, with the request's id, token counts and finish reason."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from entity_llm_client import AsyncLLMClient, LLMClient
from entity_llm_server import LLMService, UnifiedLLMResource
from entity_llm_server.testing import FakeEngine
from entity_llm_server.tracing import Tracing, wanted

from ..conftest import wait_until

pytestmark = pytest.mark.model

GENERATE = "entity.grpc.LLMService/Generate"


@pytest.fixture
def traced(serve):
    """A server on the demo model that traces into memory, and its spans."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    server = serve(LLMService(UnifiedLLMResource(default_max_new_tokens=8)), tracing=Tracing(provider)).start()
    yield server, spans
    provider.shutdown()


def _server_span(spans: InMemorySpanExporter, name: str = GENERATE):
    assert wait_until(lambda: any(s.name == name for s in spans.get_finished_spans()), timeout=10)
    (span,) = [s for s in spans.get_finished_spans() if s.name == name]
    return span


def test_one_trace_spans_the_client_call_the_rpc_and_its_phases(traced, client_spans):
    server, spans = traced
    with LLMClient(server.target, timeout=60) as client:
        done = client.complete("def f(x):", metadata=[("x-request-id", "trace-1")])
    (mine,) = [s for s in client_spans.get_finished_spans() if s.name == "entity.grpc.LLMService/Generate"]
    rpc = _server_span(spans)
    # The server's span continues the client's trace (W3C traceparent in the metadata).
    assert mine.kind is SpanKind.CLIENT
    assert rpc.kind is SpanKind.SERVER
    assert rpc.context.trace_id == mine.context.trace_id
    assert rpc.parent is not None
    assert rpc.parent.span_id == mine.context.span_id
    for span in (mine, rpc):
        assert span.attributes["entity_llm.request_id"] == "trace-1"
        assert span.attributes["gen_ai.usage.output_tokens"] == done.usage.generated_tokens == 8
        assert span.attributes["gen_ai.usage.input_tokens"] == done.usage.input_tokens
        assert tuple(span.attributes["gen_ai.response.finish_reasons"]) == ("max_tokens",)
    # The phases, in order, inside the RPC.
    phases = {s.name: s for s in spans.get_finished_spans() if s.parent and s.parent.span_id == rpc.context.span_id}
    assert sorted(phases) == ["decode", "prefill", "queue"]
    queue, prefill, decode = phases["queue"], phases["prefill"], phases["decode"]
    assert rpc.start_time <= queue.start_time <= queue.end_time <= prefill.start_time
    assert prefill.end_time <= decode.start_time <= decode.end_time <= rpc.end_time
    assert {s.context.trace_id for s in phases.values()} == {mine.context.trace_id}


def test_a_refused_call_is_an_error_span_without_phases(traced, client_spans):
    server, spans = traced
    with LLMClient(server.target, timeout=60) as client, pytest.raises(Exception, match="INVALID_ARGUMENT"):
        client.complete("x", max_new_tokens=100_000)
    rpc = _server_span(spans)
    # The client's mistake, not the server's: the server span says the code (semantic conventions).
    assert rpc.attributes["rpc.grpc.status_code"] == 3
    assert not [s for s in spans.get_finished_spans() if s.name in ("queue", "prefill", "decode")]
    (mine,) = client_spans.get_finished_spans()
    assert mine.status.status_code is StatusCode.ERROR
    assert mine.attributes["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT


def test_the_async_client_and_the_unary_rpcs_are_traced_too(traced, client_spans):
    server, spans = traced

    async def run() -> None:
        async with AsyncLLMClient(server.target, timeout=60) as client:
            await client.tokenize("def f(x):")
            await client.model_info()
            await client.complete("def f(x):", max_new_tokens=2)

    asyncio.run(run())
    names = sorted(s.name for s in client_spans.get_finished_spans())
    assert names == [f"entity.grpc.LLMService/{m}" for m in ("Generate", "GetModelInfo", "Tokenize")]
    tokenize = _server_span(spans, "entity.grpc.LLMService/Tokenize")
    (client_tokenize,) = [s for s in client_spans.get_finished_spans() if s.name.endswith("Tokenize")]
    assert tokenize.context.trace_id == client_tokenize.context.trace_id


def test_health_checks_make_no_spans_and_no_tracing_makes_none_at_all(serve, traced, client_spans):
    server, spans = traced
    with grpc.insecure_channel(server.target) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    untraced = serve(LLMService(engine=FakeEngine())).start()
    assert untraced.server.tracing is None
    with LLMClient(untraced.target, timeout=30) as client:
        client.complete("x")
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("endpoint", "env", "expected"),
    [
        (None, {}, False),
        ("http://collector:4317", {}, True),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, True),
        ("http://collector:4317", {"OTEL_SDK_DISABLED": "true"}, False),
        ("http://collector:4317", {"OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_tracing_is_on_only_when_an_endpoint_is_configured(endpoint, env, expected):
    assert wanted(endpoint, env) is expected
