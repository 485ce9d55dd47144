"""Property test: random valid and invalid Generate requests against a real server.

Valid requests end with exactly one final message whose counts agree with
what was streamed and whose logprobs agree by value; invalid ones get
INVALID_ARGUMENT naming the field and the problem, in the message and in the
BadRequest details; nothing crashes or hangs (every call has a deadline).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entity_llm_server import LLMService, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingSettings
from entity_llm_server.engine.sampling import MIN_TEMPERATURE

from ..conftest import ServerThread

pytestmark = pytest.mark.model

UNSPECIFIED = llm_pb2.FINISH_REASON_UNSPECIFIED
DEFAULT_LENGTH = 16  # the fixture's default_max_new_tokens
EOS_ID = 0  # the demo model's <|endoftext|>
# 40 in the suite; `ENTITY_LLM_PROPERTY_EXAMPLES=2000` for a deeper search.
PROPERTY_EXAMPLES = int(os.environ.get("ENTITY_LLM_PROPERTY_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    resource = UnifiedLLMResource(
        default_max_new_tokens=DEFAULT_LENGTH, batching=BatchingSettings(max_batch_size=4, max_queue=4)
    )
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


def input_tokens(server: ServerThread, request: llm_pb2.GenerateRequest) -> int:
    """How many ids the model gets for the request's prompt: Tokenize gives exactly those."""

    async def call() -> int:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            truncate = request.truncate_input_tokens if request.HasField("truncate_input_tokens") else None
            reply = await stub.Tokenize(llm_pb2.TokenizeRequest(text=request.prompt, truncate_input_tokens=truncate))
            return reply.token_count

    return server.call(call(), timeout=60)  # type: ignore[return-value]


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=valid_requests())
def test_valid_requests_end_with_one_consistent_final_message(server, request):
    messages = generate(server, request)
    finals = [m for m in messages if m.finish_reason != UNSPECIFIED]
    assert len(finals) == 1
    assert messages[-1] is finals[0]
    last = finals[0]
    ids = [i for m in messages for i in m.token_ids]
    wanted = request.max_new_tokens if request.HasField("max_new_tokens") else DEFAULT_LENGTH
    assert last.generated_token_count == len(ids)
    assert 1 <= len(ids) <= wanted
    assert last.input_token_count == input_tokens(server, request)
    # The prompt and the length always fit the context here: never TOKEN_LIMIT, and no time limit is set.
    reasons = {llm_pb2.FINISH_REASON_MAX_TOKENS, llm_pb2.FINISH_REASON_EOS}
    if request.stop_sequences:
        reasons.add(llm_pb2.FINISH_REASON_STOP_SEQUENCE)
    assert last.finish_reason in reasons
    if last.finish_reason == llm_pb2.FINISH_REASON_MAX_TOKENS:
        assert len(ids) == wanted
    # An EOS ends the stream: it is the last id, and only then.
    assert (last.finish_reason == llm_pb2.FINISH_REASON_EOS) == (ids[-1] == EOS_ID)
    assert EOS_ID not in ids[:-1]
    if request.HasField("min_new_tokens") and last.finish_reason == llm_pb2.FINISH_REASON_EOS:
        assert len(ids) > request.min_new_tokens
    output = "".join(m.token for m in messages)
    if last.finish_reason == llm_pb2.FINISH_REASON_STOP_SEQUENCE:
        assert last.stop_sequence in request.stop_sequences
        assert output.endswith(last.stop_sequence) == request.include_stop_sequence
    else:
        assert last.stop_sequence == ""
    if not request.include_stop_sequence:
        assert not any(stop in output for stop in request.stop_sequences)
    entries = [e for m in messages for e in m.logprobs]
    sampled = request.HasField("temperature") and request.temperature >= MIN_TEMPERATURE
    if request.logprobs or request.top_logprobs:
        assert [e.token_id for e in entries] == ids
        for e in entries:
            assert e.logprob <= 0  # NaN fails too
            top = [(t.token_id, t.logprob) for t in e.top_logprobs]
            assert len(top) == request.top_logprobs
            assert [logprob for _, logprob in top] == sorted((logprob for _, logprob in top), reverse=True)
            # Logprobs by value: the chosen token's is its entry among the likeliest, if it is there;
            # greedy chooses the likeliest, so it is the first.
            assert all(logprob == e.logprob for token, logprob in top if token == e.token_id)
            if top and not sampled:
                assert top[0] == (e.token_id, e.logprob)
    else:
        assert entries == []
    assert last.HasField("seed") == sampled
    if sampled and request.HasField("seed"):
        assert last.seed == request.seed
    # The request id rides on the first and the last message only.
    assert messages[0].request_id
    assert last.request_id == messages[0].request_id
    assert all(m.request_id == "" for m in messages[1:-1])


# One broken field each: the field the error must name, and what it must say of it.
INVALID = [
    ({"temperature": -1.0}, "temperature", "must be between 0 (greedy) and 100, got -1"),
    ({"temperature": math.inf}, "temperature", "must be between 0 (greedy) and 100, got inf"),
    ({"top_p": 0.0}, "top_p", "must be in (0, 1], got 0"),
    ({"top_p": 1.01}, "top_p", "must be in (0, 1], got 1.01"),
    ({"top_p": math.nan}, "top_p", "must be in (0, 1], got nan"),
    ({"repetition_penalty": -2.0}, "repetition_penalty", "must be in (0, 10], got -2"),
    ({"top_logprobs": 11}, "top_logprobs", "at most 10, got 11"),
    (
        {"max_new_tokens": 0},
        "max_new_tokens",
        "must be at least 1 when set (0 only with prompt_logprobs, to score the prompt)",
    ),
    ({"max_new_tokens": 100_000}, "max_new_tokens", "100000 is more than this model's context allows (511)"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens", "5 is more than max_new_tokens (4)"),
    ({"truncate_input_tokens": 0}, "truncate_input_tokens", "must be at least 1 when set"),
    ({"time_limit_ms": 0}, "time_limit_ms", "must be at least 1 when set"),
    ({"stop_sequences": ["a"] * 7}, "stop_sequences", "at most 6, got 7"),
    ({"stop_sequences": [""]}, "stop_sequences[0]", "must not be empty"),
    ({"stop_sequences": ["x" * 241]}, "stop_sequences[0]", "longer than 240 bytes"),
    ({"request_id": "r" * 129}, "request_id", "longer than 128 characters"),
    (
        {"request_id": "id\x1f"},
        "request_id",
        "only printable ASCII characters",
    ),  # found by the fuzzer: invalid as metadata
    ({"request_id": "café"}, "request_id", "only printable ASCII characters"),
    (
        {"messages": [llm_pb2.ChatMessage(role="user", content="hi")]},
        "messages",
        "send one of prompt, messages and prompt_token_ids, not prompt and messages",
    ),
]


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(INVALID), valid=valid_requests())
def test_invalid_requests_are_invalid_argument_naming_the_field(server, case, valid):
    fields, field, description = case
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
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"invalid request: {field}: {description}"
    status = rpc_status.from_call(error)
    assert status is not None
    (detail,) = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [(field, description)]
