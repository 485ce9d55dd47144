"""Status details -> typed errors, on calls that fail in ways a real server rarely does."""

from __future__ import annotations

import grpc

from entity_llm_client import FieldViolation, InvalidArgumentError, UnavailableError
from entity_llm_client._errors import from_rpc_error
from entity_llm_client._gen.google.protobuf import Any
from entity_llm_client._gen.google.rpc import BadRequest, BadRequestFieldViolation, RetryInfo, Status


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailers: tuple[tuple[str, str | bytes], ...]) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "bad"

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailers


def _status(*details: Any) -> bytes:
    return bytes(Status(code=3, message="bad", details=list(details)))


def test_bad_request_details_become_field_violations_and_other_details_are_skipped():
    bad = BadRequest(field_violations=[BadRequestFieldViolation(field="top_k", description="too big")])
    raw = _status(Any.pack(RetryInfo()), Any.pack(bad))
    error = from_rpc_error(
        _Failed(grpc.StatusCode.INVALID_ARGUMENT, (("x-other", "1"), ("grpc-status-details-bin", raw)))
    )
    assert isinstance(error, InvalidArgumentError)
    assert error.field_violations == (FieldViolation("top_k", "too big"),)
    assert (error.code, error.details) == (grpc.StatusCode.INVALID_ARGUMENT, "bad")


def test_missing_or_malformed_details_give_no_violations_and_keep_the_status():
    for trailers in ((), (("grpc-status-details-bin", b"\xff\xff\xff"),)):
        error = from_rpc_error(_Failed(grpc.StatusCode.INVALID_ARGUMENT, trailers))
        assert isinstance(error, InvalidArgumentError)
        assert error.field_violations == ()


def test_other_codes_keep_their_classes():
    assert isinstance(from_rpc_error(_Failed(grpc.StatusCode.UNAVAILABLE, ())), UnavailableError)
