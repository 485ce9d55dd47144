"""Property test: random valid and invalid Generate requests against a real server.

Valid requests end with exactly one final message whose counts agree with
what was streamed; invalid ones get INVALID_ARGUMENT naming the field; nothing
crashes or hangs (every call has a deadline).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entity_llm_server import LLMService, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingSettings
from entity_llm_server.engine.sampling import MIN_TEMPERATURE

from ..conftest import ServerThread

pytestmark = pytest.mark.model

UNSPECIFIED = llm_pb2.FINISH_REASON_UNSPECIFIED
# 40 in the suite; `ENTITY_LLM_PROPERTY_EXAMPLES=2000` for a deeper search.
PROPERTY_EXAMPLES = int(os.environ.get("ENTITY_LLM_PROPERTY_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    resource = UnifiedLLMResource(default_max_new_tokens=16, batching=BatchingSettings(max_batch_size=4, max_queue=4))
    thread = ServerThread(LLMService(resource)).start()
    yield thread
    thread.stop()


def generate(server: ServerThread, request: llm_pb2.GenerateRequest) -> list[llm_pb2.GenerateResponse]:
    async def call() -> list[llm_pb2.GenerateResponse]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            return [m async for m in stub.Generate(request, timeout=30)]

    return server.call(call(), timeout=60)  # type: ignore[return-value]


text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
stop_text = st.text(alphabet=st.sampled_from(list(" \n():=_abcdefinrst.,0123456789")), min_size=1, max_size=3)


@st.composite
def valid_requests(draw: st.DrawFn) -> llm_pb2.GenerateRequest:
    request = llm_pb2.GenerateRequest(
        prompt=draw(text),
        stop_sequences=draw(st.lists(stop_text, max_size=3)),
        include_stop_sequence=draw(st.booleans()),
        logprobs=draw(st.booleans()),
        top_logprobs=draw(st.integers(0, 3)),
    )
    if draw(st.booleans()):
        request.max_new_tokens = draw(st.integers(1, 16))
    if draw(st.booleans()):
        request.temperature = draw(st.floats(0, 3))
        request.top_p = draw(st.floats(0.05, 1))
        request.top_k = draw(st.integers(0, 50))
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        request.repetition_penalty = draw(st.floats(0.5, 2))
    if draw(st.booleans()):
        request.truncate_input_tokens = draw(st.integers(1, 600))
    if request.HasField("max_new_tokens") and draw(st.booleans()):
        request.min_new_tokens = draw(st.integers(0, request.max_new_tokens))
    return request


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=valid_requests())
def test_valid_requests_end_with_one_consistent_final_message(server, request):
    messages = generate(server, request)
    finals = [m for m in messages if m.finish_reason != UNSPECIFIED]
    assert len(finals) == 1
    assert messages[-1] is finals[0]
    last = finals[0]
    ids = [i for m in messages for i in m.token_ids]
    assert last.generated_token_count == len(ids)
    if request.HasField("max_new_tokens"):
        assert last.generated_token_count <= request.max_new_tokens
    if last.finish_reason == llm_pb2.FINISH_REASON_MAX_TOKENS:
        assert last.generated_token_count == (request.max_new_tokens if request.HasField("max_new_tokens") else 16)
    if request.HasField("min_new_tokens") and last.finish_reason == llm_pb2.FINISH_REASON_EOS:
        assert last.generated_token_count > request.min_new_tokens
    output = "".join(m.token for m in messages)
    if last.finish_reason == llm_pb2.FINISH_REASON_STOP_SEQUENCE:
        assert last.stop_sequence in request.stop_sequences
        assert output.endswith(last.stop_sequence) == request.include_stop_sequence or not last.stop_sequence
    if not request.include_stop_sequence:
        assert not any(stop in output for stop in request.stop_sequences)
    if request.logprobs or request.top_logprobs:
        entries = [e for m in messages for e in m.logprobs]
        assert [e.token_id for e in entries] == ids
        assert all(len(e.top_logprobs) == request.top_logprobs for e in entries)
        assert all(e.logprob <= 1e-4 and not math.isnan(e.logprob) for e in entries)
    sampled = request.HasField("temperature") and request.temperature >= MIN_TEMPERATURE
    assert last.HasField("seed") == sampled
    if sampled and request.HasField("seed"):
        assert last.seed == request.seed
    assert messages[0].request_id
    assert last.request_id == messages[0].request_id


# One broken field each; the field the error must name.
INVALID = [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"repetition_penalty": -2.0}, "repetition_penalty"),
    ({"top_logprobs": 11}, "top_logprobs"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 100_000}, "max_new_tokens"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens"),
    ({"truncate_input_tokens": 0}, "truncate_input_tokens"),
    ({"time_limit_ms": 0}, "time_limit_ms"),
    ({"stop_sequences": ["a"] * 7}, "stop_sequences"),
    ({"stop_sequences": [""]}, "stop_sequences[0]"),
    ({"stop_sequences": ["x" * 241]}, "stop_sequences[0]"),
    ({"request_id": "r" * 129}, "request_id"),
    ({"request_id": "id\x1f"}, "request_id"),  # found by the fuzzer: invalid as metadata
    ({"request_id": "café"}, "request_id"),
    ({"messages": [llm_pb2.ChatMessage(role="user", content="hi")]}, "messages"),
]


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(INVALID), valid=valid_requests())
def test_invalid_requests_are_invalid_argument_naming_the_field(server, case, valid):
    fields, field = case
    request = llm_pb2.GenerateRequest()
    request.CopyFrom(valid)
    request.ClearField("min_new_tokens")  # a valid one could break the new max_new_tokens
    if not request.prompt:
        request.prompt = "x"  # "messages" is invalid only beside a prompt
    for name, value in fields.items():
        if isinstance(value, list):
            request.ClearField(name)
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        generate(server, request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field}:" in (caught.value.details() or "")
