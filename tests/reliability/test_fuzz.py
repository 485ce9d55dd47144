"""Bad input: a hypothesis fuzzer of Generate requests, from odd fields to bytes that do not parse.

Only the documented status codes may come back (OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED); never UNKNOWN or INTERNAL, never a hang (every call has
a deadline), and the server keeps serving afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entity_llm_server import LLMService, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2
from entity_llm_server.engine import BatchingSettings

from ..conftest import ServerThread
from .conftest import record, size

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
METHOD = "/entity.grpc.LLMService/Generate"
EXAMPLES = size(300, 10_000)
SEEN: dict[str, int] = {}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    settings_ = BatchingSettings(max_batch_size=8, max_queue=8)
    thread = ServerThread(LLMService(UnifiedLLMResource(default_max_new_tokens=4, batching=settings_))).start()
    started = time.perf_counter()
    yield thread
    # The server still serves after all of it.
    after = llm_pb2.GenerateRequest(prompt="x", max_new_tokens=2).SerializeToString()
    assert call(thread, after)[0] is grpc.StatusCode.OK
    record("fuzz: requests", sum(SEEN.values()))
    record("fuzz: status codes", dict(sorted(SEEN.items())))
    record("fuzz: seconds", round(time.perf_counter() - started, 1))
    thread.stop()


def call(server: ServerThread, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Send raw request bytes; the call's status and details."""

    async def send() -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            generate = channel.unary_stream(METHOD)  # no serializers: bytes on the wire, as given
            try:
                async for _ in generate(payload, timeout=30):
                    pass
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details() or ""
            return grpc.StatusCode.OK, ""

    code, details = server.call(send(), timeout=60)  # type: ignore[misc]
    SEEN[code.name] = SEEN.get(code.name, 0) + 1
    return code, details


text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)


@st.composite
def requests(draw: st.DrawFn) -> llm_pb2.GenerateRequest:
    """Any field with any value its type can hold (valid or not), prompts up to ~1 MB."""
    r = llm_pb2.GenerateRequest()
    prompt = draw(st.one_of(text, st.just(""), st.builds(lambda s, n: s * n, text, st.integers(1, 4000))))
    r.prompt = prompt[:1_000_000]
    uint = st.integers(0, 2**32 - 1)
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    for name, strategy in (
        ("max_new_tokens", st.one_of(st.integers(0, 8), uint)),
        ("truncate_input_tokens", uint),
        ("time_limit_ms", uint),
        ("temperature", floats),
        ("top_p", floats),
        ("top_k", uint),
        ("repetition_penalty", floats),
        ("min_new_tokens", uint),
        ("seed", st.integers(0, 2**64 - 1)),
        ("top_logprobs", st.integers(0, 20)),
    ):
        if draw(st.booleans()):
            setattr(r, name, draw(strategy))
    r.logprobs = draw(st.booleans())
    r.include_stop_sequence = draw(st.booleans())
    r.stop_sequences.extend(draw(st.lists(text, max_size=8)))
    r.request_id = draw(st.one_of(st.just(""), text))
    for role, content in draw(st.lists(st.tuples(text, text), max_size=3)):
        r.messages.add(role=role, content=content)
    return r


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests())
def test_random_requests_get_only_documented_codes(server, request):
    code, details = call(server, request.SerializeToString())
    assert code in DOCUMENTED, (code, details)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert ":" in details  # names the field


def _with_bad_utf8(payload: bytes) -> bytes:
    # Field 1 (prompt), length-delimited, with bytes that are not UTF-8.
    return payload + b"\x0a\x03\xff\xfe\xfd"


@settings(max_examples=max(EXAMPLES // 3, 50), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    base=requests(),
    noise=st.binary(max_size=64),
    how=st.sampled_from(["random bytes", "truncated", "flipped", "bad utf-8"]),
)
def test_bytes_that_do_not_parse_are_invalid_argument(server, base, noise, how):
    payload = base.SerializeToString()
    if how == "random bytes":
        payload = noise
    elif how == "truncated":
        payload = payload[: max(len(payload) - 1 - len(noise), 0)] + noise[:1]
    elif how == "flipped" and payload:
        cut = len(noise) % len(payload)
        payload = payload[:cut] + bytes([payload[cut] ^ 0xFF]) + payload[cut + 1 :]
    else:
        payload = _with_bad_utf8(payload)
    code, details = call(server, payload)
    assert code in DOCUMENTED, (code, details)


def test_an_oversized_request_is_resource_exhausted_and_the_server_goes_on(server):
    code, _ = call(server, llm_pb2.GenerateRequest(prompt="x" * (9 << 20)).SerializeToString())
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    after = llm_pb2.GenerateRequest(prompt="y", max_new_tokens=2).SerializeToString()
    assert call(server, after)[0] is grpc.StatusCode.OK


def test_bad_utf8_in_the_prompt_names_the_problem(server):
    code, details = call(server, _with_bad_utf8(b""))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details
