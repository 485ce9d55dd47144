"""Message size limits and undecodable requests: clear status codes, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

from entity_llm_client import LLMClient, OverloadedError
from entity_llm_server import FakeEngine, LLMService
from entity_llm_server.server import MAX_MESSAGE_BYTES

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
    ("method", "payload", "problem"),
    [
        (GENERATE, b"\x0a\x02\xff\xfe", "String field had bad UTF-8"),  # prompt (field 1) is not UTF-8
        (GENERATE, b"\xff\xff\xff\xff", "Wire format was corrupt"),
        (TOKENIZE, b"\x0a\x80", "Wire format was corrupt"),  # a length that runs past the end
    ],
)
def test_bytes_that_do_not_parse_are_invalid_argument_naming_the_problem(serve, method, payload, problem):
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
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "request could not be decoded" in caught.value.details()
    assert problem in caught.value.details()
    assert "entity.grpc." in caught.value.details()  # the message type it should have been
    with LLMClient(server.target, timeout=10) as client:
        assert client.complete("still serving").text == "Hello, world!"
