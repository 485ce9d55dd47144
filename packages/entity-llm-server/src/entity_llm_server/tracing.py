"""OpenTelemetry tracing: a span per RPC and one per phase of a Generate, exported over OTLP.

OpenTelemetry's own gRPC instrumentation makes the RPC's SERVER span (taking
the caller's W3C `traceparent` from the metadata, so a trace crosses the
client → replica hop); the operations interceptor adds the request's id,
token counts and finish reason to it, and, when the call ends, three child
spans with the moments it measured:

- `queue`: from the call's start until the front end hands the request to
  its engine core (admission, the chat template, tokenization);
- `prefill`: from then until the first token (waiting for a place in the
  batch, and the prompt's forward pass);
- `decode`: from the first token to the last message.

Off unless configured (`--otlp-endpoint`, or the standard
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`): then nothing of OpenTelemetry is
imported, no interceptor is added and no exporter thread runs. The SDK and
exporter come with the `tracing` extra (`pip install entity-llm-server[tracing]`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

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
    """What the server traces with: OpenTelemetry's server interceptor and a tracer for the phases.

    Args:
        provider: an OpenTelemetry TracerProvider (the SDK's, or any other).
    """

    def __init__(self, provider: Any) -> None:
        try:
            from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
        except ImportError as exc:
            raise ImportError(f"tracing needs OpenTelemetry's gRPC instrumentation: {EXTRA} ({exc})") from exc
        from opentelemetry import trace

        self.provider = provider
        self._trace = trace
        self.tracer = provider.get_tracer(TRACER_NAME)
        # Probes call the health service every few seconds: no spans for them.
        self.interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]  # unannotated upstream
            tracer_provider=provider, filter_=filters.negate(filters.service_name(HEALTH_SERVICE))
        )

    def current_span(self) -> Any:
        """The RPC's span (the instrumentation's interceptor made it current), if it records."""
        span = self._trace.get_current_span()
        return span if span.is_recording() else None

    def finish(self, span: Any, request_id: str, last: Any, moments: Moments) -> None:
        """Name the RPC's outcome on its span and add the phase spans."""
        span.set_attribute(REQUEST_ID, request_id)
        if isinstance(last, llm_pb2.GenerateResponse) and last.finish_reason:
            name = llm_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
            span.set_attribute(FINISH_REASONS, [name])
            span.set_attribute(INPUT_TOKENS, last.input_token_count)
            span.set_attribute(OUTPUT_TOKENS, last.generated_token_count)
        if not moments.handoff:
            return  # refused or invalid: it never reached the engine
        parent = self._trace.set_span_in_context(span)
        ended = time.perf_counter()
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
