"""Tracing as an operator turns it on: the console script exports its spans over OTLP to a collector,
in the caller's trace; without an endpoint it imports no OpenTelemetry and runs no exporter."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from entity_llm_client import LLMClient

from ..conftest import RunningServer, wait_until
from .conftest import inspect_serving

pytestmark = pytest.mark.e2e


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802  # the OTLP method's name
        with self._lock:
            self.received.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received."""
        found = []
        with self._lock:
            for request in self.received:
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    found += [(resource, s) for scope in resource_spans.scope_spans for s in scope.spans]
        return found


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, port
    server.stop(None)


def test_the_console_script_exports_its_spans_into_the_callers_trace(collector, client_spans):
    received, port = collector
    with RunningServer("--otlp-endpoint", f"http://127.0.0.1:{port}", "--max-new-tokens", "8") as server:
        with LLMClient(server.target, timeout=60) as client:
            client.complete("def f(x):", metadata=[("x-request-id", "otlp-1")])
        assert server.stop() == 0  # the exporter flushes what it holds on the way out
        assert "tracing: spans go to" in server.stderr()
    (mine,) = client_spans.get_finished_spans()
    assert wait_until(lambda: len(received.spans()) >= 4, timeout=10)
    ours = [(r, s) for r, s in received.spans() if int.from_bytes(s.trace_id, "big") == mine.context.trace_id]
    names = sorted(s.name for _, s in ours)
    assert names == ["decode", "entity.grpc.LLMService/Generate", "prefill", "queue"]
    assert {r["service.name"] for r, _ in ours} == {"entity-llm-server"}
    (rpc,) = [s for _, s in ours if s.name.startswith("entity.grpc")]
    attributes = {a.key: a.value for a in rpc.attributes}
    assert attributes["entity_llm.request_id"].string_value == "otlp-1"
    assert attributes["gen_ai.usage.output_tokens"].int_value == 8


def test_without_an_endpoint_no_opentelemetry_is_imported_and_no_exporter_runs():
    served = inspect_serving("prompt", {"OTEL_SERVICE_NAME": "not-exported"})
    assert served["tokens"] == 8
    assert not [name for name in served["threads"] if name.startswith("OtelBatch")]
    assert "opentelemetry" not in served["packages"]
