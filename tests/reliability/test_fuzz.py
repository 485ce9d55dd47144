"""Bad input: a hypothesis fuzzer of Generate requests, from odd fields to bytes that do not parse.

Every request gets the one outcome the documented limits decide: OK, or
INVALID_ARGUMENT naming exactly the fields that break them (in the message and
in the `google.rpc.BadRequest` details); never UNKNOWN or INTERNAL, never a
hang (every call has a deadline), and the server keeps serving afterwards.
Bytes that do not parse are always INVALID_ARGUMENT; those that break only
UTF-8 name each string field that is not UTF-8.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoTokenizer

from entity_llm_server import LLMService, UnifiedLLMResource, default_model_path
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingSettings

from ..conftest import ServerThread
from .conftest import record, size

METHOD = "/entity.grpc.LLMService/Generate"
EXAMPLES = size(300, 10_000)
SEEN: dict[str, int] = {}
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
CONTEXT = 512  # the demo model's, and within the fixture's KV cache (8 sequences)
VOCAB = AutoConfig.from_pretrained(default_model_path()).vocab_size
NOT_UTF8 = "not valid UTF-8"
PARSER = "request could not be decoded: Error parsing message with type 'entity.grpc.GenerateRequest': "
BAD_UTF8 = PARSER + "String field had bad UTF-8"
CORRUPT = PARSER + "Wire format was corrupt"
PROMPT_TOO_LONG = "leave no room in the model's 512-token context; set truncate_input_tokens to keep only the last ones"

Violations = list[tuple[str, str]]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    settings_ = BatchingSettings(max_batch_size=8, max_queue=8)
    thread = ServerThread(LLMService(UnifiedLLMResource(default_max_new_tokens=4, batching=settings_))).start()
    started = time.perf_counter()
    yield thread
    # The server still serves after all of it.
    after = llm_pb2.GenerateRequest(prompt="x", max_new_tokens=2).SerializeToString()
    assert call(thread, after)[0] is OK
    record("fuzz: requests", sum(SEEN.values()))
    record("fuzz: status codes", dict(sorted(SEEN.items())))
    record("fuzz: seconds", round(time.perf_counter() - started, 1))
    thread.stop()


@pytest.fixture(scope="module")
def tokenizer():
    """The demo model's tokenizer, to render chat messages as the server's template does."""
    return AutoTokenizer.from_pretrained(default_model_path())


def call(server: ServerThread, payload: bytes) -> tuple[grpc.StatusCode, str, Violations]:
    """Send raw request bytes; the call's status, details and BadRequest field violations."""

    async def send() -> tuple[grpc.StatusCode, str, Violations]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            generate = channel.unary_stream(METHOD)  # no serializers: bytes on the wire, as given
            try:
                async for _ in generate(payload, timeout=30):
                    pass
            except grpc.aio.AioRpcError as error:
                violations: Violations = []
                if (status := rpc_status.from_call(error)) is not None:
                    for detail in status.details:
                        bad = error_details_pb2.BadRequest()
                        assert detail.Unpack(bad), detail
                        violations += [(v.field, v.description) for v in bad.field_violations]
                return error.code(), error.details() or "", violations
            return OK, "", []

    code, details, violations = server.call(send(), timeout=60)  # type: ignore[misc]
    SEEN[code.name] = SEEN.get(code.name, 0) + 1
    return code, details, violations


def token_count(server: ServerThread, text: str) -> int:
    """How many ids the model gets for `text`, up to the context (Tokenize gives exactly a prompt's ids)."""

    async def tokenize() -> int:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            reply = await stub.Tokenize(llm_pb2.TokenizeRequest(text=text, truncate_input_tokens=CONTEXT), timeout=30)
            return reply.token_count

    return server.call(tokenize(), timeout=60)  # type: ignore[return-value]


# -- what the documented limits say of a request ---------------------------------------------------


def limit_violations(r: llm_pb2.GenerateRequest) -> Violations:
    """The limits a request breaks, as validation reports them (every one, in this order)."""
    found: Violations = []
    if r.HasField("max_new_tokens") and r.max_new_tokens == 0 and not r.HasField("prompt_logprobs"):
        found.append(
            ("max_new_tokens", "must be at least 1 when set (0 only with prompt_logprobs, to score the prompt)")
        )
    for name in ("truncate_input_tokens", "time_limit_ms"):
        if r.HasField(name) and getattr(r, name) == 0:
            found.append((name, "must be at least 1 when set"))
    if len(r.stop_sequences) > 6:
        found.append(("stop_sequences", f"at most 6, got {len(r.stop_sequences)}"))
    for i, stop in enumerate(r.stop_sequences):
        if not stop:
            found.append((f"stop_sequences[{i}]", "must not be empty"))
        elif len(stop.encode()) > 240:
            found.append((f"stop_sequences[{i}]", "longer than 240 bytes"))
    if len(r.request_id) > 128:
        found.append(("request_id", "longer than 128 characters"))
    elif any(not " " <= c <= "~" for c in r.request_id):
        found.append(("request_id", "only printable ASCII characters"))
    if r.HasField("temperature") and not (math.isfinite(r.temperature) and 0 <= r.temperature <= 100):
        found.append(("temperature", f"must be between 0 (greedy) and 100, got {r.temperature:g}"))
    if r.HasField("top_p") and not 0 < r.top_p <= 1:
        found.append(("top_p", f"must be in (0, 1], got {r.top_p:g}"))
    if r.HasField("repetition_penalty") and not 0 < r.repetition_penalty <= 10:
        found.append(("repetition_penalty", f"must be in (0, 10], got {r.repetition_penalty:g}"))
    if r.HasField("min_new_tokens") and r.HasField("max_new_tokens") and r.min_new_tokens > r.max_new_tokens:
        found.append(("min_new_tokens", f"{r.min_new_tokens} is more than max_new_tokens ({r.max_new_tokens})"))
    if r.top_logprobs > 10:
        found.append(("top_logprobs", f"at most 10, got {r.top_logprobs}"))
    if r.HasField("min_p") and not 0 <= r.min_p <= 1:
        found.append(("min_p", f"must be between 0 and 1, got {r.min_p:g}"))
    if r.HasField("typical_p") and not 0 < r.typical_p <= 1:
        found.append(("typical_p", f"must be in (0, 1], got {r.typical_p:g}"))
    for name in ("presence_penalty", "frequency_penalty"):
        if r.HasField(name) and not -2 <= getattr(r, name) <= 2:
            found.append((name, f"must be between -2 and 2, got {getattr(r, name):g}"))
    if len(r.logit_bias) > 300:
        found.append(("logit_bias", f"at most 300 entries, got {len(r.logit_bias)}"))
    for token, bias in sorted(r.logit_bias.items()):
        if not -100 <= bias <= 100:
            found.append((f"logit_bias[{token}]", f"must be between -100 and 100, got {bias:g}"))
    if r.HasField("prompt_logprobs") and r.prompt_logprobs > 10:
        found.append(("prompt_logprobs", f"at most 10 alternatives, got {r.prompt_logprobs}"))
    if r.HasField("n") and not 1 <= r.n <= 16:
        found.append(("n", f"must be between 1 and 16, got {r.n}"))
    elif r.n > 1 and r.HasField("max_new_tokens") and r.max_new_tokens == 0:
        found.append(("n", "more than one sample of nothing: max_new_tokens 0 only scores the prompt"))
    if len(r.stop_token_ids) > 16:
        found.append(("stop_token_ids", f"at most 16, got {len(r.stop_token_ids)}"))
    given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(r, name)]
    if len(given) > 1:
        found.append((given[-1], f"send one of prompt, messages and prompt_token_ids, not {' and '.join(given)}"))
    found += [(f"messages[{i}].role", "must not be empty") for i, m in enumerate(r.messages) if not m.role]
    if (which := r.WhichOneof("constraint")) is not None:
        if which == "json_object" and not r.json_object:
            found.append(("json_object", "set it to true for any JSON object, or leave it out"))
        if which == "choice" and not r.choice.options:
            found.append(("choice", "give at least one string to choose from"))
        size = (
            sum(len(o.encode()) for o in r.choice.options)
            if which == "choice"
            else len(str(getattr(r, which)).encode())
        )
        if size > 64 * 1024:
            found.append((which, "is over 64 KiB"))
        if r.min_new_tokens:
            found.append(
                ("min_new_tokens", "cannot be combined with a constraint, which ends the output when it is complete")
            )
        if r.ignore_eos:
            found.append(
                (
                    "ignore_eos",
                    "cannot be combined with a constraint, which ends the output with an end-of-sequence token",
                )
            )
    return found


def model_violation(server: ServerThread, tokenizer, r: llm_pb2.GenerateRequest) -> tuple[str, str] | None:
    """What the model refuses in a request within the limits: a constraint that does not compile (its
    description's start: llguidance words the rest), a prompt that fills its context, or a length beyond it."""
    which = r.WhichOneof("constraint")
    if which is not None and (said := BROKEN.get(which, {}).get(str(getattr(r, which)))) is not None:
        return which, said
    named = [(f"prompt_token_ids[{i}]", t) for i, t in enumerate(r.prompt_token_ids)]
    named += [(f"stop_token_ids[{i}]", t) for i, t in enumerate(r.stop_token_ids)]
    named += [(f"logit_bias[{t}]", t) for t in sorted(r.logit_bias)]
    for field, token in named:
        if token >= VOCAB:
            return field, f"{token} is not a token id of this model (its vocabulary has {VOCAB})"
    text = r.prompt
    if r.messages:
        chat = [{"role": m.role, "content": m.content} for m in r.messages]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    truncated = r.HasField("truncate_input_tokens") and r.truncate_input_tokens < CONTEXT
    count = len(r.prompt_token_ids) if r.prompt_token_ids else token_count(server, text)
    if not truncated and count >= CONTEXT:
        return "prompt", PROMPT_TOO_LONG
    if r.HasField("max_new_tokens") and r.max_new_tokens > CONTEXT - 1:
        return "max_new_tokens", f"{r.max_new_tokens} is more than this model's context allows ({CONTEXT - 1})"
    return None


def assert_outcome(server, tokenizer, request: llm_pb2.GenerateRequest, outcome) -> None:
    """The outcome of sending `request` is exactly what the limits and the model decide."""
    code, details, violations = outcome
    if expected := limit_violations(request):
        event("refused: limits")
        assert (code, violations) == (INVALID, expected), details
    elif (refused := model_violation(server, tokenizer, request)) is not None:
        event(f"refused by the model: {refused[0]}")
        assert code is INVALID, details
        ((field, said),) = expected = violations
        if field == "prompt":  # its count: Tokenize here stops at the context, so only the bound is known
            count, _, said = said.partition(" tokens ")
            assert int(count) >= CONTEXT
        if field in CONSTRAINTS:  # llguidance's own words follow the start the oracle knows
            assert field == refused[0]
            assert said.startswith(refused[1]), said
            assert details == f"invalid request: {field}: {said}"
            return
        assert (field, said) == refused
    else:
        event("served")
        assert (code, details, violations) == (OK, "", [])
        return
    assert details == "invalid request: " + "; ".join(f"{field}: {said}" for field, said in expected)


text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)

CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")
# Constraints that compile, and ones that do not (with how their refusal begins).
WORKING = {
    "json_schema": [
        '{"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}',
        '{"type": "integer"}',
    ],
    "regex": ["[a-z]{1,3}", "(yes|no)"],
    "grammar": ['start: "x" | "y" "z"'],
}
BROKEN = {
    "json_schema": {"{not json": "does not parse: ", "[1]": "a JSON Schema is a JSON object"},
    "regex": {"a(": "cannot be used: "},
    "grammar": {"start: nowhere": "cannot be used: "},
}


@st.composite
def constraints(draw: st.DrawFn, r: llm_pb2.GenerateRequest) -> None:
    """Set one constraint on `r`: one that works, one that does not compile, or one the limits refuse."""
    kind = draw(st.sampled_from(CONSTRAINTS))
    if kind == "json_object":
        r.json_object = draw(st.booleans())
    elif kind == "choice":
        r.choice.options.extend(
            draw(st.lists(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20), max_size=3))
        )
    elif kind == "regex" and draw(st.integers(0, 9)) == 0:
        r.regex = "a" * (64 * 1024 + 1)
    else:
        setattr(r, kind, draw(st.sampled_from([*WORKING[kind], *BROKEN[kind]])))


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
    draw(samplers(r))
    if draw(st.integers(0, 3)) == 0:
        draw(constraints(r))
    return r


@st.composite
def samplers(draw: st.DrawFn, r: llm_pb2.GenerateRequest) -> None:
    """Now and then, the newer request fields: stop tokens, ignore_eos, the samplers, a token-id prompt."""
    if draw(st.integers(0, 2)):
        return
    token = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, 2**32 - 1))
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    for name in ("min_p", "typical_p", "presence_penalty", "frequency_penalty"):
        if draw(st.booleans()):
            setattr(r, name, draw(st.one_of(floats, st.floats(-2.5, 2.5, width=32))))
    r.stop_token_ids.extend(draw(st.lists(token, max_size=18)))
    r.ignore_eos = draw(st.booleans())
    size = draw(st.sampled_from([0, 3, 301]))
    r.logit_bias.update(draw(st.dictionaries(token, st.one_of(floats, st.floats(-100, 100, width=32)), max_size=size)))
    if draw(st.booleans()):
        r.prompt_token_ids.extend(draw(st.lists(token, max_size=600)))
    if draw(st.booleans()):
        r.prompt_logprobs = draw(st.integers(0, 12))
    if draw(st.booleans()):
        r.n = draw(st.integers(0, 18))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests())
def test_random_requests_get_exactly_the_outcome_the_limits_decide(server, tokenizer, request):
    assert_outcome(server, tokenizer, request, call(server, request.SerializeToString()))


@st.composite
def constrained_requests(draw: st.DrawFn) -> llm_pb2.GenerateRequest:
    """Requests within the other limits, each with a constraint: one that works, one that does not
    compile, or one the limits refuse (with min_new_tokens now and then)."""
    r = llm_pb2.GenerateRequest(prompt=draw(st.text(max_size=40)), max_new_tokens=draw(st.integers(1, 16)))
    if draw(st.booleans()):
        r.temperature, r.seed = draw(st.sampled_from([0.5, 1.0, 2.0])), draw(st.integers(0, 2**32))
    if draw(st.integers(0, 7)) == 0:
        r.min_new_tokens = 1
    draw(constraints(r))
    return r


@settings(max_examples=size(60, 1_000), deadline=None, suppress_health_check=list(HealthCheck))
@given(request=constrained_requests())
def test_random_constraints_get_exactly_the_outcome_the_limits_and_the_compiler_decide(server, tokenizer, request):
    assert_outcome(server, tokenizer, request, call(server, request.SerializeToString()))


# -- bytes ------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


# Bytes that make any UTF-8 text before them invalid, whatever follows: bytes
# UTF-8 never uses (FF, F5), a continuation byte where a character must start,
# an overlong encoding, a surrogate.
NEVER_UTF8 = [b"\xff", b"\xf5\x80\x80\x80", b"\x80", b"\xc0\x80", b"\xed\xa0\x80"]


@st.composite
def not_utf8(draw: st.DrawFn) -> bytes:
    return draw(text).encode() + draw(st.sampled_from(NEVER_UTF8)) + draw(st.binary(max_size=16))


def with_bad_string(base: llm_pb2.GenerateRequest, where: str, bad: bytes) -> tuple[bytes, str]:
    """`base` serialized, then one more string field whose bytes are `bad`; the field's name."""
    payload = base.SerializeToString()
    if where == "prompt":
        return payload + length_delimited(1, bad), "prompt"
    if where == "stop_sequences":
        return payload + length_delimited(3, bad), f"stop_sequences[{len(base.stop_sequences)}]"
    if where == "request_id":
        return payload + length_delimited(7, bad), "request_id"
    role, content = (bad, b"user") if where == "role" else (b"user", bad)
    message = length_delimited(1, role) + length_delimited(2, content)
    return payload + length_delimited(16, message), f"messages[{len(base.messages)}].{where}"


@settings(max_examples=max(EXAMPLES // 3, 50), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    base=requests(),
    bad=not_utf8(),
    where=st.sampled_from(["prompt", "stop_sequences", "request_id", "role", "content"]),
)
def test_a_string_that_is_not_utf8_is_invalid_argument_naming_its_field(server, base, bad, where):
    # Whatever else the request holds: the bytes do not parse, so no limit is even looked at.
    payload, field = with_bad_string(base, where, bad)
    assert call(server, payload) == (INVALID, f"{BAD_UTF8}; {field}: {NOT_UTF8}", [(field, NOT_UTF8)])


@st.composite
def broken_tails(draw: st.DrawFn) -> bytes:
    """A field the wire format cannot hold, whatever came before it: each ends a parse at once."""
    noise = draw(st.binary(max_size=32))
    number = draw(st.integers(1, 2**29 - 1))
    return draw(
        st.sampled_from(
            [
                varint(number << 3 | 2)
                + varint(len(noise) + draw(st.integers(1, 2**20)))
                + noise,  # length past the end
                b"\x00" + noise,  # field number 0
                varint(number << 3 | draw(st.sampled_from([6, 7]))) + noise,  # no such wire type
                varint(number << 3 | 4) + noise,  # an end-group tag without its start
                varint(number << 3) + b"\xff" * draw(st.integers(0, 9)),  # a varint cut off by the end
                varint(number << 3 | 5) + noise[:3],  # a fixed32 cut off by the end
                varint(number << 3 | 1) + noise[:7],  # a fixed64 cut off by the end
            ]
        )
    )


@settings(max_examples=max(EXAMPLES // 3, 50), deadline=None, suppress_health_check=list(HealthCheck))
@given(base=requests(), tail=broken_tails())
def test_a_broken_wire_format_is_invalid_argument_naming_the_problem(server, base, tail):
    assert call(server, base.SerializeToString() + tail) == (INVALID, CORRUPT, [])


@settings(max_examples=max(EXAMPLES // 3, 50), deadline=None, suppress_health_check=list(HealthCheck))
@given(base=requests(), noise=st.binary(max_size=64), how=st.sampled_from(["random bytes", "truncated", "flipped"]))
def test_mangled_bytes_are_served_as_what_they_parse_to_or_refused(server, tokenizer, base, noise, how):
    # These may or may not parse: the reference parser says which, and the
    # server must agree with it either way.
    payload = base.SerializeToString()
    if how == "random bytes":
        payload = noise
    elif how == "truncated":
        payload = payload[: max(len(payload) - 1 - len(noise), 0)] + noise[:1]
    elif payload:
        cut = len(noise) % len(payload)
        payload = payload[:cut] + bytes([payload[cut] ^ 0xFF]) + payload[cut + 1 :]
    outcome = call(server, payload)
    parsed, error = reference_parse(payload)
    if parsed is not None:
        assert_outcome(server, tokenizer, parsed, outcome)
        return
    event(f"does not parse: {error.rsplit(': ', 1)[-1]}")
    code, details, violations = outcome
    assert code is INVALID
    assert details == "; ".join([f"request could not be decoded: {error}", *(f"{f}: {d}" for f, d in violations)])
    assert all(description == NOT_UTF8 for _, description in violations)
    if details.startswith(BAD_UTF8):  # the parser met a string that is not UTF-8: it is named
        assert violations


def reference_parse(payload: bytes) -> tuple[llm_pb2.GenerateRequest | None, str]:
    """The request google-protobuf parses from `payload`, or None and why it cannot."""
    try:
        return llm_pb2.GenerateRequest.FromString(payload), ""
    except DecodeError as error:
        return None, str(error)


def test_an_oversized_request_is_resource_exhausted_and_the_server_goes_on(server):
    code, details, _ = call(server, llm_pb2.GenerateRequest(prompt="x" * (9 << 20)).SerializeToString())
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details
    after = llm_pb2.GenerateRequest(prompt="y", max_new_tokens=2).SerializeToString()
    assert call(server, after) == (OK, "", [])


def test_bad_utf8_in_the_prompt_names_the_problem_and_the_field(server):
    # Field 1 (prompt), length-delimited, with bytes that are not UTF-8.
    assert call(server, b"\x0a\x03\xff\xfe\xfd") == (INVALID, f"{BAD_UTF8}; prompt: {NOT_UTF8}", [("prompt", NOT_UTF8)])
