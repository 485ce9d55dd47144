"""OpenTelemetry, when the application uses it: a CLIENT span per call, its W3C trace context sent in
the call's metadata so the server's spans join the same trace.

Nothing here needs OpenTelemetry: without `opentelemetry-api` installed (the
client's `tracing` extra), a call carries no trace context and costs one
check. With it, spans go wherever the application's tracer provider sends
them (nowhere, until one is configured).
"""

from __future__ import annotations

from typing import Any

from ._transport import SERVICE
from ._types import Chunk

_api: Any = None  # (trace, propagate) once imported, False without opentelemetry-api


def _opentelemetry() -> Any:
    global _api  # imported once, on the first call, never at import time
    if _api is None:
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            _api = False
        else:
            _api = (trace, propagate)
    return _api


class Traced:
    """One call's span (None without OpenTelemetry) and the metadata that carries its context."""

    __slots__ = ("metadata", "span")

    def __init__(self, method: str, target: str) -> None:
        self.span: Any = None
        self.metadata: tuple[tuple[str, str], ...] = ()
        api = _opentelemetry()
        if not api:
            return
        trace, propagate = api
        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method, "server.address": target}
        span = trace.get_tracer("entity_llm_client").start_span(
            f"{SERVICE}/{method}", kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        self.span, self.metadata = span, tuple(carrier.items())

    def end(self, error: BaseException | None = None, **attributes: Any) -> None:
        """End the span, with `attributes` (None values left out) and the call's error, if any."""
        span = self.span
        if span is None:
            return
        for name, value in attributes.items():
            if value is not None:
                span.set_attribute(name, value)
        if error is not None:
            trace, _ = _api
            code = getattr(error, "code", None)
            span.set_attribute("rpc.grpc.status_code", code.value[0] if code is not None else 2)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        span.end()


def outcome(request_id: str, finals: list[Chunk]) -> dict[str, Any]:
    """A stream's attributes, as the server names them on its span, from each sample's last chunk.

    One finish reason per sample (in sample order); the prompt's tokens once
    (every sample has the same prompt), the generated ones of all samples.
    """
    attributes: dict[str, Any] = {"entity_llm.request_id": request_id or None}
    reasons, usages = [], []
    for chunk in sorted(finals, key=lambda c: c.index):
        if chunk.finish_reason is not None and chunk.usage is not None:
            reasons.append(chunk.finish_reason.value)
            usages.append(chunk.usage)
    if usages:
        attributes["gen_ai.response.finish_reasons"] = reasons
        attributes["gen_ai.usage.input_tokens"] = usages[0].input_tokens
        attributes["gen_ai.usage.output_tokens"] = sum(usage.generated_tokens for usage in usages)
    return attributes
