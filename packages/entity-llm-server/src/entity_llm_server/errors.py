"""The one boundary where exceptions become gRPC status codes.

INVALID_ARGUMENT carries a `google.rpc.BadRequest` with one field violation per
broken limit (in the `grpc-status-details-bin` trailer, via grpcio-status), and
its message names each field too, for clients that read only the message.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .engine import EngineError, EngineOverloadedError, EngineUnavailableError, InvalidRequestError
from .validation import RequestValidationError, UndecodableRequestError

log = logging.getLogger(__name__)

Trailers = tuple[tuple[str, str | bytes], ...]


def _bad_request(violations: list[tuple[str, str]], message: str) -> tuple[grpc.StatusCode, str, Trailers]:
    details = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in violations
        ]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    status.details.add().Pack(details)
    rich = rpc_status.to_status(status)
    return rich.code, rich.details, tuple(rich.trailing_metadata)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, Trailers]:
    """Map a domain exception to what a client sees: code, message, and trailers with details."""
    if isinstance(exc, RequestValidationError):
        return _bad_request(exc.violations, f"invalid request: {exc}")
    if isinstance(exc, UndecodableRequestError):
        return _bad_request(exc.violations, str(exc))
    if isinstance(exc, InvalidRequestError):
        return _bad_request([(exc.field, exc.description)], f"invalid request: {exc}")
    if isinstance(exc, EngineOverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), ()
    if isinstance(exc, EngineUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), ()
    if isinstance(exc, EngineError):
        return grpc.StatusCode.INTERNAL, str(exc), ()
    return grpc.StatusCode.INTERNAL, f"unexpected server error: {type(exc).__name__}", ()


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    code, message, trailers = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("request failed")
    await context.abort(code, message, trailers)


@contextlib.asynccontextmanager
async def error_boundary(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """Wrap a servicer method's body: domain errors end the call with their status.

    A context manager rather than a wrapping generator, so a streamed message
    passes through no extra generator layer on the per-token path.
    """
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await _abort(context, exc)
