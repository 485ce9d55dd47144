"""entity-llm-client: a typed client for entity.grpc.LLMService.

from entity_llm_client import LLMClient

with LLMClient("localhost:50051") as client:
    for piece in client.generate("def fibonacci(n):"):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from ._async_client import AsyncLLMClient
from ._errors import (
    CancelledError,
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    LLMError,
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
)
from ._sync_client import LLMClient
from ._types import (
    Chunk,
    Completion,
    FinishReason,
    GenerateOptions,
    ModelInfo,
    TokenLogprob,
    Tokens,
    TopLogprob,
    Usage,
)

__all__ = [
    "AsyncLLMClient",
    "CancelledError",
    "Chunk",
    "Completion",
    "DeadlineExceededError",
    "FieldViolation",
    "FinishReason",
    "GenerateOptions",
    "InvalidArgumentError",
    "LLMClient",
    "LLMError",
    "ModelInfo",
    "OverloadedError",
    "TokenLogprob",
    "Tokens",
    "TopLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
]
