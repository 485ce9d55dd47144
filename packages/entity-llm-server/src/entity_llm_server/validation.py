"""Request limits, checked before any work: INVALID_ARGUMENT naming each field."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._gen.entity.grpc import llm_pb2

MAX_STOP_SEQUENCES = 6
MAX_STOP_SEQUENCE_BYTES = 240
MAX_REQUEST_ID_CHARS = 128


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
    if problems:
        raise RequestValidationError(problems)


def validate_tokenize(request: llm_pb2.TokenizeRequest) -> None:
    """Raise RequestValidationError listing every limit the request breaks."""
    if problems := _positive(request, "truncate_input_tokens"):
        raise RequestValidationError(problems)
