"""The client's exceptions, translated from gRPC status at one boundary."""

from __future__ import annotations

import grpc


class LLMError(Exception):
    """A call to the server failed.

    Attributes:
        code: the gRPC status code.
        details: the server's (or the transport's) message.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(LLMError):
    """The request was malformed (INVALID_ARGUMENT)."""


class OverloadedError(LLMError):
    """The server is at capacity or the request is too large (RESOURCE_EXHAUSTED)."""


class UnauthenticatedError(LLMError):
    """Missing or wrong credentials (UNAUTHENTICATED)."""


class UnavailableError(LLMError):
    """The server could not be reached or is shutting down (UNAVAILABLE)."""


class DeadlineExceededError(LLMError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""


class CancelledError(LLMError):
    """The call was cancelled (CANCELLED)."""


_BY_CODE: dict[grpc.StatusCode, type[LLMError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def from_rpc_error(error: grpc.RpcError) -> LLMError:
    """The LLMError subclass for a failed call (sync or aio)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    return _BY_CODE.get(code, LLMError)(code, details)
