"""Request ids: taken from x-request-id (or the request), echoed, and on every log record of the RPC."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator

import grpc
import pytest

from entity_llm_client import InvalidArgumentError, LLMClient
from entity_llm_server import LLMService
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import EngineEvent, EngineRequest
from entity_llm_server.logs import JsonFormatter, RequestIdFilter
from entity_llm_server.testing import FakeEngine

from ..conftest import wait_until

engine_log = logging.getLogger("tests.engine")


class ChattyEngine(FakeEngine):
    """Logs from inside the RPC, as a real engine's coroutines may."""

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        engine_log.info("generating for the engine's id %s", request.request_id)
        async for event in super().generate(request):
            yield event


@pytest.fixture
def records(caplog):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO)
    return caplog


def _generate(target: str, request: llm_pb2.GenerateRequest, metadata=()):
    with grpc.insecure_channel(target) as channel:
        call = llm_pb2_grpc.LLMServiceStub(channel).Generate(request, metadata=metadata, timeout=10)
        responses = list(call)
        return dict(call.initial_metadata()), responses


def _finished(records, request_id: str) -> logging.LogRecord:
    assert wait_until(lambda: any(r.getMessage().startswith("rpc finished") and r.request_id == request_id
                                  for r in records.records))  # fmt: skip
    return next(r for r in records.records if r.getMessage().startswith("rpc finished") and r.request_id == request_id)


def test_an_x_request_id_is_echoed_used_by_the_servicer_and_logged(serve, records):
    server = serve(LLMService(engine=ChattyEngine())).start()
    metadata, responses = _generate(server.target, llm_pb2.GenerateRequest(prompt="x"), [("x-request-id", "trace-7")])
    assert metadata["x-request-id"] == "trace-7"
    assert responses[0].request_id == responses[-1].request_id == "trace-7"
    engine_records = [r for r in records.records if r.name == "tests.engine"]
    assert [r.request_id for r in engine_records] == ["trace-7"]
    assert engine_records[0].getMessage().endswith("trace-7")
    done = _finished(records, "trace-7")
    assert done.levelno == logging.INFO
    assert (done.grpc_method, done.code, done.tokens) == ("/entity.grpc.LLMService/Generate", "OK", 4)
    assert done.duration_ms >= 0
    assert "method=/entity.grpc.LLMService/Generate code=OK" in done.getMessage()
    # The JSON formatter writes the same fields as one object.
    entry = json.loads(JsonFormatter().format(done))
    assert (entry["request_id"], entry["code"], entry["tokens"]) == ("trace-7", "OK", 4)


def test_without_a_header_the_request_field_or_a_fresh_id_is_used_everywhere(serve, records):
    server = serve(LLMService(engine=FakeEngine())).start()
    metadata, responses = _generate(server.target, llm_pb2.GenerateRequest(prompt="x", request_id="field-1"))
    assert responses[0].request_id == responses[-1].request_id == "field-1"
    assert "x-request-id" not in metadata  # headers are echoed to callers that sent one
    _finished(records, "field-1")

    metadata, responses = _generate(server.target, llm_pb2.GenerateRequest(prompt="x"))
    made = responses[0].request_id
    assert len(made) == 32
    assert responses[-1].request_id == made
    assert "x-request-id" not in metadata
    _finished(records, made)


def test_failed_rpcs_are_logged_with_their_status_and_unary_rpcs_echo_the_id(serve, records):
    server = serve(LLMService(engine=FakeEngine())).start()
    with LLMClient(server.target, timeout=10) as client, pytest.raises(InvalidArgumentError):
        client.complete("x", max_new_tokens=0, metadata=[("x-request-id", "bad-1")])
    assert _finished(records, "bad-1").code == "INVALID_ARGUMENT"
    with grpc.insecure_channel(server.target) as channel:
        _, call = llm_pb2_grpc.LLMServiceStub(channel).Tokenize.with_call(
            llm_pb2.TokenizeRequest(text="a b"), metadata=[("x-request-id", "tok-1")], timeout=10
        )
        assert dict(call.initial_metadata())["x-request-id"] == "tok-1"
    assert _finished(records, "tok-1").code == "OK"
