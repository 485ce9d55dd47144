"""One server interceptor for what every RPC goes through: ids, keys, drain, decoding, metrics, logs.

It wraps each handler once (one extra generator layer on the per-token path,
not one per concern) and, per RPC:

1. takes the request id from `x-request-id` metadata, else the request's own
   `request_id` field, else makes one; puts it on every log record of the
   RPC, fills an empty `request_id` field with it so the servicer echoes the
   same id in its responses, and echoes a caller's header in the initial
   metadata, sent with the first response: never earlier, since response
   headers commit a call (gRFC A6) and a refusal that comes after them
   (the drain's UNAVAILABLE, a full engine's RESOURCE_EXHAUSTED) could no
   longer be retried on another replica;
2. checks the API key (`authorization: Bearer <key>`) when keys are set,
   and, with fair shares set, refuses a Generate stream over its key's or its
   client host's share with RESOURCE_EXHAUSTED; with a stalled-stream
   timeout, hands each Generate stream to the watch that ends it when its
   client stops reading (`stalls.py`);
3. refuses new RPCs with UNAVAILABLE once a drain has begun, and counts the
   admitted ones so the drain can wait for them;
4. answers INVALID_ARGUMENT, naming the problem (and each string field that
   is not UTF-8), for request bytes that do not parse (grpcio alone would
   answer UNKNOWN "Exception deserializing request");
5. records metrics and writes one log line when the RPC ends, with its final
   status code: OK, an abort's code, CANCELLED, DEADLINE_EXCEEDED or UNKNOWN;
6. when tracing, names the RPC's outcome on its span and adds the spans of
   its phases (`tracing.py`).

The health service stays open: no key, and still answered during a drain, so
probes keep working.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool

from . import logs
from .auth import ApiKeys
from .drain import SHUTTING_DOWN, DrainGate
from .engine.base import HANDOFF
from .errors import status_for
from .health import HEALTH_SERVICE, LLM_SERVICE
from .metrics import Metrics
from .shares import Shares
from .stalls import StalledStreams
from .tracing import Moments
from .validation import MAX_REQUEST_ID_CHARS, UndecodableRequestError, non_utf8_fields

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor

    from .tracing import Tracing

log = logging.getLogger("entity_llm_server.access")

REQUEST_ID_HEADER = "x-request-id"
OPEN_SERVICES = frozenset({HEALTH_SERVICE})


class _Undecodable:
    """What the tolerant deserializer returns for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: UndecodableRequestError) -> None:
        self.error = error


def _request_type(method: str) -> Descriptor | None:
    """The request message of `/package.Service/Method`, from the default descriptor pool."""
    try:
        return descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", ".")).input_type
    except KeyError:
        return None


def _tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # handed to the behavior, which answers INVALID_ARGUMENT
            request_type = _request_type(method)
            fields = non_utf8_fields(request_type, data) if request_type is not None else []
            error = str(exc) or type(exc).__name__
            return _Undecodable(UndecodableRequestError(error, [(field, "not valid UTF-8") for field in fields]))

    return deserialize


class _Call:
    __slots__ = (
        "context", "echo", "finals", "gated", "key", "last", "method", "moments", "open", "request_id", "shared",
        "span", "stalled", "start", "stream", "streamed_ids", "task", "timed", "writing", "written",
    )  # fmt: skip

    def __init__(self, method: str) -> None:
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        self.method = method
        self.open = service in OPEN_SERVICES
        self.timed = service == LLM_SERVICE  # token timings: Generate's messages, not health Watch's
        self.start = time.perf_counter()
        self.request_id = ""
        self.echo = False  # the caller sent x-request-id: echo it in the initial metadata
        self.gated = False
        self.last: Any = None
        self.finals: list[Any] = []  # Generate's last message of each sample (GenerateRequest.n)
        self.streamed_ids = 0
        self.span: Any = None  # the RPC's span, when tracing
        self.stream = False  # a server-streaming RPC (Generate, for the LLM service)
        self.key: int | None = None  # the API key's place in the key file
        self.shared: str | None = None  # the peer whose share the call counts against
        self.moments: Moments | None = None
        # For the stalled-stream watch (`stalls.py`): a Generate stream's
        # writes, and what ends it.
        self.writing = False
        self.written = 0
        self.stalled = False
        self.task: asyncio.Task[Any] | None = None
        self.context: Any = None

    def streamed(self, message: Any) -> None:
        """Count a message the stream sent: its ids, and (Generate) each sample's last message."""
        self.last = message
        self.streamed_ids += len(getattr(message, "token_ids", ()))
        if getattr(message, "finish_reason", 0):
            self.finals.append(message)


def _request_id(metadata: Any, request: Any) -> str:
    """The header's id, else the request's `request_id` field, else a new one."""
    header = next((value for key, value in metadata if key == REQUEST_ID_HEADER), None)
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    own = getattr(request, "request_id", None)
    if header and header.strip():
        rid = header.strip()[:MAX_REQUEST_ID_CHARS]
    elif isinstance(own, str) and own:
        return own  # for logs only: metadata echoes a caller's header, never the field
    else:
        rid = uuid.uuid4().hex
    if own == "":
        request.request_id = rid  # the servicer echoes the field: one id in metadata, responses and logs
    return rid


async def _echoing(stream: AsyncIterator[Any], context: Any, request_id: str) -> AsyncIterator[Any]:
    """`stream`, with the request-id header sent just before its first message:
    once the handler has a response, the call has been accepted."""
    async with aclosing(stream) as messages:  # type: ignore[type-var]
        async for message in messages:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
            yield message
            break
        async for message in messages:
            yield message


def _final_code(error: BaseException | None, context: Any) -> grpc.StatusCode:
    if error is None or isinstance(error, grpc.aio.AbortError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what grpcio answers for an unhandled exception


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]  # generic in grpc-stubs only
else:
    _Interceptor = grpc.aio.ServerInterceptor


class OperationsInterceptor(_Interceptor):
    """See the module's docstring.

    Args:
        api_keys: accepted keys; empty accepts every call.
        gate: the drain gate.
        metrics: where RPCs are recorded.
        token_timings: time every message of a Generate stream (the TTFT and
            inter-token histograms); off when no metrics are served, since
            it is the interceptor's only per-token cost.
        tracing: traces the RPCs (None: no tracing, at no cost).
        shares: the streams one API key or one client host may hold (None: no limits).
        stalls: ends Generate streams whose client stopped reading (None: never).
    """

    def __init__(
        self,
        *,
        api_keys: ApiKeys,
        gate: DrainGate,
        metrics: Metrics,
        token_timings: bool = True,
        tracing: Tracing | None = None,
        shares: Shares | None = None,
        stalls: StalledStreams | None = None,
    ) -> None:
        self.api_keys = api_keys
        self.stalls = stalls
        self.shares = shares if shares is not None and shares.limited else None
        self.gate = gate
        self.metrics = metrics
        self.token_timings = token_timings
        self.tracing = tracing

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpcio answers UNIMPLEMENTED
            return None
        method: str = handler_call_details.method
        if handler.request_streaming and handler.response_streaming:
            make, inner = grpc.stream_stream_rpc_method_handler, handler.stream_stream
        elif handler.request_streaming:
            make, inner = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        elif handler.response_streaming:
            make, inner = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        else:
            make, inner = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        behavior = self._stream(method, inner) if inspect.isasyncgenfunction(inner) else self._unary(method, inner)
        deserializer = handler.request_deserializer
        if not handler.request_streaming:
            deserializer = _tolerant(deserializer, method)
        return make(behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)

    def _unary(self, method: str, inner: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def behavior(request: Any, context: Any) -> Any:
            call = self._open(method, context)
            error: BaseException | None = None
            try:
                await self._admit(call, request, context)
                response = await inner(request, context)
                if call.echo:  # accepted and answered: the headers may go now
                    await context.send_initial_metadata(((REQUEST_ID_HEADER, call.request_id),))
                return response
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._close(call, context, error)

        return behavior

    def _stream(self, method: str, inner: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        first_token = self.metrics.time_to_first_token.observe
        between_tokens = self.metrics.inter_token_latency.observe
        clock = time.perf_counter

        async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
            call = self._open(method, context)
            call.stream = True
            error: BaseException | None = None
            try:
                await self._admit(call, request, context)
                source = inner(request, context)
                if call.echo:
                    source = _echoing(source, context, call.request_id)
                async with aclosing(source) as stream:  # type: ignore[type-var]
                    if not call.timed:
                        async for message in stream:
                            yield message
                        return
                    # `writing` spans the write of each message (grpc.aio
                    # resumes this generator when the write is done): the
                    # stalled-stream watch reads it.
                    if not self.token_timings:  # nobody scrapes the latency histograms
                        async for message in stream:
                            if call.moments is not None:  # a trace's first-token moment
                                call.moments.first_token = clock()
                            call.streamed(message)
                            call.writing = True
                            yield message
                            call.writing = False
                            call.written += 1
                            break
                        async for message in stream:
                            call.streamed(message)
                            call.writing = True
                            yield message
                            call.writing = False
                            call.written += 1
                        return
                    # The per-token path: locals only, one clock read per message.
                    last_at = 0.0
                    async for message in stream:
                        now = clock()
                        if last_at:
                            between_tokens(now - last_at)
                        else:
                            first_token(now - call.start)
                            if call.moments is not None:
                                call.moments.first_token = now
                        last_at = now
                        call.streamed(message)
                        call.writing = True
                        yield message
                        call.writing = False
                        call.written += 1
            except BaseException as exc:  # GeneratorExit too: grpcio dropped the stream
                error = exc
                raise
            finally:
                self._close(call, context, error)

        return behavior

    def _open(self, method: str, context: Any) -> _Call:
        call = _Call(method)
        self.metrics.in_flight.labels(method).inc()
        if self.tracing is not None:
            moments = Moments(call.start)
            span = self.tracing.start(method, context.invocation_metadata() or (), moments.ns(call.start))
            if span is not None:
                call.span, call.moments = span, moments
                HANDOFF.set(moments.handoff)  # the RPC's own context: its task's
        return call

    async def _admit(self, call: _Call, request: Any, context: Any) -> None:
        metadata = context.invocation_metadata() or ()
        call.request_id = _request_id(metadata, request)
        logs.request_id.set(call.request_id)
        # Echo the caller's header, only then: headers sent ahead of the
        # first message measurably slow every later message of a stream in
        # grpc.aio (benchmarks/transport.py: ~25% at one stream); the id is in
        # the first and last messages' request_id field anyway.
        call.echo = any(key == REQUEST_ID_HEADER for key, _ in metadata)
        if not call.open:
            problem, call.key = self.api_keys.caller(metadata)
            if problem is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            if not self.gate.enter():
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            call.gated = True
            if self.shares is not None and call.stream and call.timed:
                peer = context.peer()
                if (refusal := self.shares.take(call.key, peer)) is not None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
                call.shared = peer
            if self.stalls is not None and call.stream and call.timed:
                call.task, call.context = asyncio.current_task(), context
                self.stalls.watch(call)
        if isinstance(request, _Undecodable):
            await context.abort(*status_for(request.error))

    def _close(self, call: _Call, context: Any, error: BaseException | None) -> None:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if call.stalled else _final_code(error, context)
        seconds = time.perf_counter() - call.start
        tokens = 0
        if call.timed and call.last is not None:
            # Each sample's last message counts every token it generated (an
            # EOS and trimmed stop text included); the ids streamed count a
            # stream cut short, even after some of its samples had ended.
            finals = call.finals
            tokens = max(sum(f.generated_token_count for f in finals), call.streamed_ids)
            self.metrics.generated_tokens.inc(tokens)
            self.metrics.prompt_tokens.inc(sum(f.input_token_count for f in finals))
            self.metrics.cached_prompt_tokens.inc(sum(f.cached_token_count for f in finals))
        m = self.metrics
        m.in_flight.labels(call.method).dec()
        m.requests.labels(call.method, code.name).inc()
        m.duration.labels(call.method).observe(seconds)
        if call.gated:
            self.gate.leave()
        if self.shares is not None and call.shared is not None:
            self.shares.give_back(call.key, call.shared)
        if self.stalls is not None and call.task is not None:
            self.stalls.forget(call)
            call.task = call.context = None
        if self.tracing is not None and call.span is not None and call.moments is not None:
            try:
                self.tracing.finish(call.span, code, call.request_id, call.finals, call.moments)
            except Exception:  # a tracing fault must not fail the RPC
                log.exception("could not record the RPC's trace")
        log.log(
            logging.DEBUG if call.open else logging.INFO,
            "rpc finished method=%s code=%s duration_ms=%.1f tokens=%d",
            call.method,
            code.name,
            seconds * 1000,
            tokens,
            extra={"grpc_method": call.method, "code": code.name, "duration_ms": round(seconds * 1000, 3),
                   "tokens": tokens, "request_id": call.request_id or logs.request_id.get()},
        )  # fmt: skip
