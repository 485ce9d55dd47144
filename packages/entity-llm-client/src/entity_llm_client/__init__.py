"""entity-llm-client: a typed client for entity.grpc.LLMService.

from entity_llm_client import LLMClient

with LLMClient("localhost:50051") as client:
    for piece in client.generate("def fibonacci(n):"):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

from ._client import AsyncLLMClient, LLMClient
from ._errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    LLMError,
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
)
from ._types import Chunk

__all__ = [
    "AsyncLLMClient",
    "CancelledError",
    "Chunk",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "LLMClient",
    "LLMError",
    "OverloadedError",
    "UnauthenticatedError",
    "UnavailableError",
]
