"""The one boundary where exceptions become gRPC status codes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc

from .engine import EngineError, EngineOverloadedError, InvalidRequestError

log = logging.getLogger(__name__)

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

StreamHandler = Callable[[Any, _Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Response]]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map a domain exception to the status and message a client sees."""
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, EngineOverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"unexpected server error: {type(exc).__name__}"


def translate_errors(handler: StreamHandler[_Request, _Response]) -> StreamHandler[_Request, _Response]:
    """Wrap a server-streaming handler so domain errors end the call with a status."""

    @wraps(handler)
    async def wrapper(
        self: Any, request: _Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_Response]:
        try:
            async for response in handler(self, request, context):
                yield response
        except (grpc.aio.AbortError, GeneratorExit):
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("request failed")
            await context.abort(code, message)

    return wrapper
