"""OpenTelemetry tracing: a span per RPC and one per phase of a Generate, exported over OTLP.

The operations interceptor makes each RPC's SERVER span, named and
attributed as OpenTelemetry's RPC conventions say, in the trace of the
caller's W3C `traceparent` metadata (so a trace crosses the client → replica
hop), with the request's id, token counts and finish reason, and, when the
call ends, three child spans with the moments it measured:

- `queue`: from the call's start until the front end hands the request to
  its engine core (admission, the chat template, tokenization);
- `prefill`: from then until the first token (waiting for a place in the
  batch, and the prompt's forward pass);
- `decode`: from the first token to the last message.

OpenTelemetry's gRPC instrumentation would make the same span with an
interceptor of its own, in front of this one: a second generator layer on
every message and a proxy around every servicer context, for what the
interceptor every RPC already passes can do. Side by side in the transport
benchmark (three runs) the two were not told apart; this way needs no
instrumentation package.

Off unless configured (`--otlp-endpoint`, or the standard
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`): then nothing of OpenTelemetry is
imported, no interceptor is added and no exporter thread runs. The SDK and
exporter come with the `tracing` extra (`pip install 'entity-llm-server[tracing]'`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import grpc

from ._gen.entity.grpc import llm_pb2
from .health import HEALTH_SERVICE

TRACER_NAME = "entity_llm_server"
SERVICE_NAME = "entity-llm-server"
EXTRA = "pip install 'entity-llm-server[tracing]'"

# Attribute names: OpenTelemetry's GenAI conventions where they have one.
REQUEST_ID = "entity_llm.request_id"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
# The codes that are the server's failure, not the caller's (OpenTelemetry's
# RPC conventions): the span's status is ERROR for these only.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def wanted(endpoint: str | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether traces are to be exported: an endpoint given, or the standard variables set
    (and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`)."""
    env = os.environ if env is None else env
    if _true(env.get("OTEL_SDK_DISABLED")) or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def otlp_provider(endpoint: str | None) -> Any:
    """A TracerProvider that batches spans to an OTLP/gRPC collector (`endpoint`, else the
    standard `OTEL_EXPORTER_OTLP_*` variables), its service named by `OTEL_SERVICE_NAME`
    or `entity-llm-server`.

    Raises:
        ImportError: the `tracing` extra is not installed (the message says what to install).
    """
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ImportError(f"tracing needs OpenTelemetry's SDK and OTLP exporter: {EXTRA} ({exc})") from exc
    named = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(named))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class Tracing:
    """What the server traces with: a tracer for the RPC spans and their phases.

    Args:
        provider: an OpenTelemetry TracerProvider (the SDK's, or any other).
    """

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self._trace = trace
        self._propagate = propagate
        self.tracer = provider.get_tracer(TRACER_NAME)

    def start(self, method: str, metadata: Any, start_time: int) -> Any:
        """The SERVER span of an RPC to `method` (`/package.Service/Method`) from `start_time`
        (epoch ns), in the trace its metadata carries; None for the health service, which probes
        call every few seconds."""
        service, _, name = method.lstrip("/").partition("/")
        if service == HEALTH_SERVICE:
            return None
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        span = self.tracer.start_span(
            f"{service}/{name}",
            context=self._propagate.extract(carrier),
            kind=self._trace.SpanKind.SERVER,
            attributes=attributes,
            start_time=start_time,
        )
        return span if span.is_recording() else None

    def finish(self, span: Any, code: grpc.StatusCode, request_id: str, finals: list[Any], moments: Moments) -> None:
        """Name the RPC's outcome on its span (`finals`: Generate's last message of each sample, as they
        came), add the phase spans and end it."""
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in SERVER_ERRORS:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, code.name))
        span.set_attribute(REQUEST_ID, request_id)
        ends = sorted((f for f in finals if isinstance(f, llm_pb2.GenerateResponse)), key=lambda f: f.index)
        if ends:
            names = [llm_pb2.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_").lower() for f in ends]
            span.set_attribute(FINISH_REASONS, names)  # one per sample, in sample order
            span.set_attribute(INPUT_TOKENS, ends[0].input_token_count)
            span.set_attribute(OUTPUT_TOKENS, sum(f.generated_token_count for f in ends))
        ended = time.perf_counter()
        if moments.handoff:  # else refused or invalid: it never reached the engine
            self._phases(span, moments, ended)
        span.end(end_time=moments.ns(ended))

    def _phases(self, span: Any, moments: Moments, ended: float) -> None:
        parent = self._trace.set_span_in_context(span)
        first = moments.first_token or ended
        for name, start, end in (
            ("queue", moments.start, moments.handoff[0]),
            ("prefill", moments.handoff[0], first),
            ("decode", first, ended),
        ):
            if name == "decode" and moments.first_token is None:
                break
            phase = self.tracer.start_span(name, context=parent, start_time=moments.ns(start))
            phase.end(end_time=moments.ns(end))

    def shutdown(self) -> None:
        """Export what is left and stop the exporter (the provider's own `shutdown`)."""
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is not None:
            shutdown()


class Moments:
    """When a traced RPC started, reached its engine core and streamed its first token
    (perf_counter seconds; `ns` turns them into the epoch nanoseconds spans take)."""

    __slots__ = ("_epoch", "first_token", "handoff", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self._epoch = time.time_ns() - round(start * 1e9)
        self.handoff: list[float] = []  # the front end appends the moment it hands the request on
        self.first_token: float | None = None

    def ns(self, moment: float) -> int:
        return self._epoch + round(moment * 1e9)
