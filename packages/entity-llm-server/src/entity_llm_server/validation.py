"""Request limits, checked before any work: INVALID_ARGUMENT naming each field."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

from google.protobuf.descriptor import FieldDescriptor

from .engine.constraints import MAX_CONSTRAINT_BYTES
from .engine.sampling import MAX_TOP_LOGPROBS

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor

    from ._gen.entity.grpc import llm_pb2

MAX_STOP_SEQUENCES = 6
MAX_STOP_SEQUENCE_BYTES = 240
MAX_REQUEST_ID_CHARS = 128
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_MESSAGES = 256
MAX_STOP_TOKEN_IDS = 16
MAX_SAMPLES = 16  # n
MAX_LOGIT_BIAS = 300  # entries, as OpenAI's API
MAX_BIAS = 100.0
MAX_OPENAI_PENALTY = 2.0  # presence and frequency penalties, either sign
# Either way: a request, and a reply (a Tokenize of megabytes of text).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
AT_LEAST_1 = "must be at least 1 when set"


class RequestValidationError(ValueError):
    """A request broke one or more limits.

    Attributes:
        violations: (field, description) pairs, fields named as in the proto.
    """

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {description}" for field, description in violations))
        self.violations = violations


class UndecodableRequestError(ValueError):
    """Request bytes that do not parse.

    Attributes:
        violations: (field, "not valid UTF-8") for each string field whose
            bytes are not UTF-8; empty when the wire format itself is broken.
    """

    def __init__(self, error: str, violations: list[tuple[str, str]]) -> None:
        named = (f"{field}: {description}" for field, description in violations)
        super().__init__("; ".join([f"request could not be decoded: {error}", *named]))
        self.violations = violations


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        byte = data[pos]  # IndexError: the varint runs past the end
        value, pos = value | (byte & 0x7F) << shift, pos + 1
        if byte < 0x80:
            return value, pos
    raise IndexError("a varint longer than 10 bytes")


def _field(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """(field number, wire type, start, end) of the field at `pos`; IndexError where the wire format breaks."""
    key, pos = _varint(data, pos)
    number, wire_type = key >> 3, key & 7
    start = pos
    if number == 0 or wire_type in (4, 6, 7):  # an end-group here has no start
        raise IndexError("not a field")
    if wire_type == 0:
        _, pos = _varint(data, pos)
    elif wire_type == 2:
        size, start = _varint(data, pos)
        pos = start + size
    elif wire_type == 3:  # a group (unknown fields only, in proto3): up to its end-group tag
        while _varint(data, pos)[0] != number << 3 | 4:
            pos = _field(data, pos)[3]
        pos = _varint(data, pos)[1]
    else:
        pos += 8 if wire_type == 1 else 4
    if pos > len(data):
        raise IndexError("a field runs past the end")
    return number, wire_type, start, pos


def _walk(descriptor: Descriptor, data: bytes, prefix: str, found: list[str]) -> None:
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        number, wire_type, start, pos = _field(data, pos)
        field = descriptor.fields_by_number.get(number)
        if wire_type != 2 or field is None or field.type not in (FieldDescriptor.TYPE_STRING, _MESSAGE):
            continue
        name = prefix + field.name
        if field.is_repeated:
            seen[number] = seen.get(number, -1) + 1
            name += f"[{seen[number]}]"
        if field.message_type is not None:
            _walk(field.message_type, data[start:pos], name + ".", found)
        else:
            try:
                data[start:pos].decode("utf-8")
            except UnicodeDecodeError:
                found.append(name)


def non_utf8_fields(descriptor: Descriptor, data: bytes) -> list[str]:
    """The string fields of a serialized message whose bytes are not UTF-8.

    Named as in the proto (`prompt`, `stop_sequences[1]`, `messages[0].content`),
    every occurrence on the wire, not only the one a parser keeps. Like a
    parser, the walk stops where the wire format breaks; what it found before
    that is returned.
    """
    found: list[str] = []
    with contextlib.suppress(IndexError, RecursionError):  # RecursionError: groups nested past any parser's limit
        _walk(descriptor, data, "", found)
    return found


def _positive(request: llm_pb2.GenerateRequest | llm_pb2.TokenizeRequest, field: str) -> list[tuple[str, str]]:
    if request.HasField(field) and getattr(request, field) < 1:  # type: ignore[arg-type]
        return [(field, AT_LEAST_1)]
    return []


def validate_generate(request: llm_pb2.GenerateRequest) -> None:
    """Raise RequestValidationError listing every limit the request breaks."""
    problems: list[tuple[str, str]] = []
    scoring = request.HasField("prompt_logprobs")
    if request.HasField("max_new_tokens") and request.max_new_tokens == 0 and not scoring:
        problems.append(("max_new_tokens", f"{AT_LEAST_1} (0 only with prompt_logprobs, to score the prompt)"))
    for field in ("truncate_input_tokens", "time_limit_ms"):
        problems += _positive(request, field)
    if len(request.stop_sequences) > MAX_STOP_SEQUENCES:
        problems.append(("stop_sequences", f"at most {MAX_STOP_SEQUENCES}, got {len(request.stop_sequences)}"))
    for i, stop in enumerate(request.stop_sequences):
        if not stop:
            problems.append((f"stop_sequences[{i}]", "must not be empty"))
        elif len(stop.encode()) > MAX_STOP_SEQUENCE_BYTES:
            problems.append((f"stop_sequences[{i}]", f"longer than {MAX_STOP_SEQUENCE_BYTES} bytes"))
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        problems.append(("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters"))
    elif not (request.request_id.isascii() and request.request_id.isprintable()):
        # It travels as x-request-id metadata and in log lines.
        problems.append(("request_id", "only printable ASCII characters"))
    problems += _sampling(request)
    problems += _input(request)
    problems += _constraint(request)
    if problems:
        raise RequestValidationError(problems)


def _constraint(request: llm_pb2.GenerateRequest) -> list[tuple[str, str]]:
    """The sizes and combinations of the `constraint` oneof (whether it compiles, the engine checks)."""
    which = request.WhichOneof("constraint")
    if which is None:
        return []
    problems: list[tuple[str, str]] = []
    if which == "json_object" and not request.json_object:
        problems.append(("json_object", "set it to true for any JSON object, or leave it out"))
    if which == "choice":
        if not request.choice.options:
            problems.append(("choice", "give at least one string to choose from"))
        size = sum(len(option.encode()) for option in request.choice.options)
    else:
        size = len(str(getattr(request, which)).encode())
    if size > MAX_CONSTRAINT_BYTES:
        problems.append((which, f"is over {MAX_CONSTRAINT_BYTES // 1024} KiB"))
    if request.min_new_tokens:
        problems.append(
            ("min_new_tokens", "cannot be combined with a constraint, which ends the output when it is complete")
        )
    if request.ignore_eos:
        problems.append(
            ("ignore_eos", "cannot be combined with a constraint, which ends the output with an end-of-sequence token")
        )
    return problems


def _sampling(request: llm_pb2.GenerateRequest) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if request.HasField("temperature"):
        t = request.temperature
        if not (math.isfinite(t) and 0 <= t <= MAX_TEMPERATURE):
            problems.append(("temperature", f"must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {t:g}"))
    if request.HasField("top_p") and not (0 < request.top_p <= 1):  # NaN fails too
        problems.append(("top_p", f"must be in (0, 1], got {request.top_p:g}"))
    if request.HasField("repetition_penalty"):
        r = request.repetition_penalty
        if not (0 < r <= MAX_REPETITION_PENALTY):
            problems.append(("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}], got {r:g}"))
    if (
        request.HasField("min_new_tokens")
        and request.HasField("max_new_tokens")
        and request.min_new_tokens > request.max_new_tokens
    ):
        problems.append(
            (
                "min_new_tokens",
                f"{request.min_new_tokens} is more than max_new_tokens ({request.max_new_tokens})",
            )
        )
    if request.top_logprobs > MAX_TOP_LOGPROBS:
        problems.append(("top_logprobs", f"at most {MAX_TOP_LOGPROBS}, got {request.top_logprobs}"))
    if request.HasField("min_p") and not (0 <= request.min_p <= 1):
        problems.append(("min_p", f"must be between 0 and 1, got {request.min_p:g}"))
    if request.HasField("typical_p") and not (0 < request.typical_p <= 1):
        problems.append(("typical_p", f"must be in (0, 1], got {request.typical_p:g}"))
    bound = MAX_OPENAI_PENALTY
    for field in ("presence_penalty", "frequency_penalty"):
        if request.HasField(field) and not (-bound <= (value := getattr(request, field)) <= bound):
            problems.append((field, f"must be between -{bound:g} and {bound:g}, got {value:g}"))
    if len(request.logit_bias) > MAX_LOGIT_BIAS:
        problems.append(("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(request.logit_bias)}"))
    for token, bias in sorted(request.logit_bias.items()):
        if not -MAX_BIAS <= bias <= MAX_BIAS:  # NaN fails too
            problems.append((f"logit_bias[{token}]", f"must be between -{MAX_BIAS:g} and {MAX_BIAS:g}, got {bias:g}"))
    if request.HasField("prompt_logprobs") and request.prompt_logprobs > MAX_TOP_LOGPROBS:
        problems.append(("prompt_logprobs", f"at most {MAX_TOP_LOGPROBS} alternatives, got {request.prompt_logprobs}"))
    if request.HasField("n") and not 1 <= request.n <= MAX_SAMPLES:
        problems.append(("n", f"must be between 1 and {MAX_SAMPLES}, got {request.n}"))
    elif request.n > 1 and request.HasField("max_new_tokens") and request.max_new_tokens == 0:
        problems.append(("n", "more than one sample of nothing: max_new_tokens 0 only scores the prompt"))
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        problems.append(("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS}, got {len(request.stop_token_ids)}"))
    return problems


def _input(request: llm_pb2.GenerateRequest) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(request, name)]
    if len(given) > 1:
        problems.append((given[-1], f"send one of prompt, messages and prompt_token_ids, not {' and '.join(given)}"))
    if len(request.messages) > MAX_MESSAGES:
        problems.append(("messages", f"at most {MAX_MESSAGES}, got {len(request.messages)}"))
    for i, message in enumerate(request.messages):
        if not message.role:
            problems.append((f"messages[{i}].role", "must not be empty"))
    return problems


def validate_tokenize(request: llm_pb2.TokenizeRequest) -> None:
    """Raise RequestValidationError listing every limit the request breaks."""
    if problems := _positive(request, "truncate_input_tokens"):
        raise RequestValidationError(problems)
