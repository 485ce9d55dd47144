"""The client's exceptions, translated from gRPC status at one boundary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from ._gen.google.rpc import BadRequest, Status

# Where grpcio-status (and every gRPC implementation) puts a google.rpc.Status.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_BAD_REQUEST = "google.rpc.BadRequest"
# How grpcio's round_robin (and pick_first) fail a call that no server can take.
_NO_BACKEND = ("connections to all backends failing", "failed to connect to all addresses")


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One broken rule of a request, as the server names it.

    Attributes:
        field: the request field, named as in the proto (`stop_sequences`,
            `stop_sequences[0]`, `temperature`).
        description: what is wrong with it.
    """

    field: str
    description: str


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
    """The request was malformed (INVALID_ARGUMENT).

    Attributes:
        field_violations: each broken rule, from the google.rpc.BadRequest the
            server sends in the status details (empty if it sent none).
    """

    def __init__(self, code: grpc.StatusCode, details: str, field_violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(code, details)
        self.field_violations = field_violations


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


def _status_details(error: grpc.RpcError) -> bytes | None:
    # A sync call's trailers are a tuple of pairs, an aio call's a grpc.aio.Metadata: both iterate as pairs.
    trailers: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return value
    return None


def field_violations(error: grpc.RpcError) -> tuple[FieldViolation, ...]:
    """The field violations of a google.rpc.BadRequest in the call's status details, if any."""
    raw = _status_details(error)
    if raw is None:
        return ()
    try:
        details = Status.parse(raw).details
        requests = [BadRequest.parse(d.value) for d in details if d.type_url.rpartition("/")[2] == _BAD_REQUEST]
    except Exception:  # malformed details must not hide the status they came with
        return ()
    return tuple(FieldViolation(v.field, v.description) for r in requests for v in r.field_violations)


def from_rpc_error(error: grpc.RpcError, *, balanced: bool = False) -> LLMError:
    """The LLMError subclass for a failed call (sync or aio).

    `balanced`: the call was balanced over several servers, so an UNAVAILABLE
    that no server sent means none of them could take it.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if balanced and code is grpc.StatusCode.UNAVAILABLE and details.startswith(_NO_BACKEND):
        details = f"no replica was healthy (none of the target's servers is reachable and SERVING): {details}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgumentError(code, details, field_violations(error))
    return _BY_CODE.get(code, LLMError)(code, details)
