"""Tracing as an operator turns it on: the console script exports its spans over OTLP to a collector,
in the caller's trace; without an endpoint it imports no OpenTelemetry and runs no exporter."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from entity_llm_client import LLMClient

from ..conftest import RunningServer, wait_until

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


# The console script's own `serve()`, without an endpoint: once it has answered a call (through a
# plain grpc stub, not the client SDK, which imports OpenTelemetry's API when it is installed), it
# reports which threads run and which OpenTelemetry modules were imported, then stops.
UNTRACED = """
import asyncio, io, re, signal, sys, threading
import grpc
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.config import parse_config
from entity_llm_server.server import serve

def call(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        list(llm_pb2_grpc.LLMServiceStub(channel).Generate(llm_pb2.GenerateRequest(prompt="x"), timeout=60))

async def main():
    ready = asyncio.Event()
    config = parse_config(["--host", "127.0.0.1", "--port", "0", "--max-new-tokens", "4"], env={})
    served = asyncio.create_task(serve(config, ready=ready))
    await ready.wait()
    port = re.search(r"listening on \\S+:(\\d+)", sys.stdout.getvalue()).group(1)
    await asyncio.to_thread(call, port)
    print("threads", sorted(t.name for t in threading.enumerate()), file=sys.stderr)
    print("modules", sorted(m for m in sys.modules if m.startswith("opentelemetry")), file=sys.stderr)
    signal.raise_signal(signal.SIGTERM)
    return await served

sys.stdout = io.StringIO()  # serve() prints the port there
sys.exit(asyncio.run(main()))
"""


def test_without_an_endpoint_no_opentelemetry_is_imported_and_no_exporter_runs():
    env = {"HF_HUB_OFFLINE": "1", "OTEL_SERVICE_NAME": "not-exported"}
    out = subprocess.run([sys.executable, "-c", UNTRACED], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    report = dict(line.split(" ", 1) for line in out.stderr.splitlines() if line.startswith(("threads ", "modules ")))
    assert "OtelBatch" not in report["threads"]
    assert report["modules"] == "[]"
