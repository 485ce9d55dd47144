"""Request bytes that do not parse: which string fields are not UTF-8, found on the wire as a parser reads it."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from entity_llm_server._gen.entity.grpc import llm_pb2
from entity_llm_server.errors import status_for
from entity_llm_server.validation import UndecodableRequestError, non_utf8_fields

REQUEST = llm_pb2.GenerateRequest.DESCRIPTOR
BASE = llm_pb2.GenerateRequest(
    prompt="hi", stop_sequences=["a", "b"], messages=[llm_pb2.ChatMessage(role="user", content="c")], seed=3
).SerializeToString()


@pytest.mark.parametrize(
    ("tail", "fields"),
    [
        (b"", []),
        (b"\x0a\x01\xff", ["prompt"]),  # a second prompt: the one a parser keeps, and bad
        (b"\x1a\x01\xff\x82\x01\x03\x12\x01\x80", ["stop_sequences[2]", "messages[1].content"]),
        (b"\x82\x01\x05\x0a\x03\xed\xa0\x80", ["messages[1].role"]),  # an encoded surrogate
        (b"\x22\x02\xff\xfe", []),  # include_stop_sequence (a bool) as bytes: an unknown field to a parser
        (b"\xa3\x01\x0a\x01\xff\xa4\x01\x3a\x01\xff", ["request_id"]),  # an unknown group is skipped whole
        (b"\x3a\x01\xff\x00\x0a\x01\xff", ["request_id"]),  # field number 0: the walk stops there
        (b"\x0a\x01\xff\x10" + b"\xff" * 11, ["prompt"]),  # then a varint longer than 10 bytes
        (b"\x0a\x05ab", []),  # a length past the end
        (b"\xa3\x01" * 5000 + b"\x0a\x01\xff", []),  # groups nested past any parser's depth
    ],
)
def test_the_string_fields_that_are_not_utf8_are_named_as_in_the_proto(tail, fields):
    assert non_utf8_fields(REQUEST, BASE + tail) == fields


def test_an_undecodable_request_is_invalid_argument_with_a_violation_per_field():
    error = UndecodableRequestError("String field had bad UTF-8", [("prompt", "not valid UTF-8")])
    code, message, trailers = status_for(error)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message == "request could not be decoded: String field had bad UTF-8; prompt: not valid UTF-8"
    (raw,) = [value for key, value in trailers if key == "grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    assert (status.code, status.message) == (code_pb2.INVALID_ARGUMENT, message)
    (detail,) = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [("prompt", "not valid UTF-8")]
