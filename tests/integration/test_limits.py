"""Message size limits and undecodable requests: clear status codes, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from entity_llm_client import FieldViolation, LLMClient, OverloadedError
from entity_llm_client._errors import from_rpc_error
from entity_llm_server import LLMService
from entity_llm_server.server import MAX_MESSAGE_BYTES
from entity_llm_server.testing import FakeEngine

GENERATE = "/entity.grpc.LLMService/Generate"
TOKENIZE = "/entity.grpc.LLMService/Tokenize"


def test_an_oversized_request_is_resource_exhausted_and_the_next_one_is_served(serve):
    server = serve(LLMService(engine=FakeEngine())).start()
    with LLMClient(server.target, timeout=30) as client:
        with pytest.raises(OverloadedError) as caught:
            client.complete("x" * (MAX_MESSAGE_BYTES + 1))
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in caught.value.details
        assert client.complete("x" * (MAX_MESSAGE_BYTES - 1024)).text == "Hello, world!"


@pytest.mark.parametrize(
    ("method", "payload", "problem", "fields"),
    [
        # prompt (field 1) is not UTF-8
        (GENERATE, b"\x0a\x02\xff\xfe", "String field had bad UTF-8", ["prompt"]),
        # a valid prompt, then stop_sequences[0] valid and [1] not, then messages[0].content (field 16, then 2) not
        (
            GENERATE,
            b"\x0a\x01x\x1a\x01a\x1a\x01\x80\x82\x01\x07\x0a\x01u\x12\x02\xc0\x80",
            "String field had bad UTF-8",
            ["stop_sequences[1]", "messages[0].content"],
        ),
        (TOKENIZE, b"\x0a\x03ab\xff", "String field had bad UTF-8", ["text"]),
        (GENERATE, b"\xff\xff\xff\xff", "Wire format was corrupt", []),
        (TOKENIZE, b"\x0a\x80", "Wire format was corrupt", []),  # a length that runs past the end
    ],
)
def test_bytes_that_do_not_parse_are_invalid_argument_naming_the_problem(serve, method, payload, problem, fields):
    server = serve(LLMService(engine=FakeEngine())).start()
    with grpc.insecure_channel(server.target) as channel:
        # No serializers: the raw bytes go on the wire as they are.
        if method == GENERATE:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                list(call(payload, timeout=10))
        else:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                call(payload, timeout=10)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    message_type = "GenerateRequest" if method == GENERATE else "TokenizeRequest"
    # The parser's own words, then each string field that is not UTF-8.
    parser = f"Error parsing message with type 'entity.grpc.{message_type}': {problem}"
    assert error.details() == "; ".join(
        [f"request could not be decoded: {parser}", *(f"{f}: not valid UTF-8" for f in fields)]
    )
    status = rpc_status.from_call(error)
    assert status is not None
    (detail,) = status.details
    violations = error_details_pb2.BadRequest()
    assert detail.Unpack(violations)
    assert [(v.field, v.description) for v in violations.field_violations] == [(f, "not valid UTF-8") for f in fields]
    # ...which the SDK turns into its field violations.
    assert from_rpc_error(error).field_violations == tuple(FieldViolation(f, "not valid UTF-8") for f in fields)
    with LLMClient(server.target, timeout=10) as client:
        assert client.complete("still serving").text == "Hello, world!"
