"""Request limits, checked before any work: INVALID_ARGUMENT naming each field."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .engine.sampling import MAX_TOP_LOGPROBS

if TYPE_CHECKING:
    from ._gen.entity.grpc import llm_pb2

MAX_STOP_SEQUENCES = 6
MAX_STOP_SEQUENCE_BYTES = 240
MAX_REQUEST_ID_CHARS = 128
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_MESSAGES = 256
# Either way: a request, and a reply (a Tokenize of megabytes of text).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class RequestValidationError(ValueError):
    """A request broke one or more limits.

    Attributes:
        violations: (field, description) pairs, fields named as in the proto.
    """

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {description}" for field, description in violations))
        self.violations = violations


def _positive(request: llm_pb2.GenerateRequest | llm_pb2.TokenizeRequest, field: str) -> list[tuple[str, str]]:
    if request.HasField(field) and getattr(request, field) < 1:  # type: ignore[arg-type]
        return [(field, "must be at least 1 when set")]
    return []


def validate_generate(request: llm_pb2.GenerateRequest) -> None:
    """Raise RequestValidationError listing every limit the request breaks."""
    problems: list[tuple[str, str]] = []
    for field in ("max_new_tokens", "truncate_input_tokens", "time_limit_ms"):
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
    if problems:
        raise RequestValidationError(problems)


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
    return problems


def _input(request: llm_pb2.GenerateRequest) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if request.messages and request.prompt:
        problems.append(("messages", "send either prompt or messages, not both"))
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
