"""Engines: the seam between the gRPC servicer and a model."""

from __future__ import annotations

from .base import (
    CoreState,
    Engine,
    EngineError,
    EngineEvent,
    EngineOverloadedError,
    EngineRequest,
    EngineUnavailableError,
    Finished,
    FinishReason,
    InvalidRequestError,
    ModelInfo,
    TextDelta,
    Tokens,
)
from .batching import BatchingEngine, BatchingSettings
from .fake import FakeEngine
from .sampling import Sampling, TokenLogprob
from .transformers_engine import TransformersEngine

__all__ = [
    "BatchingEngine",
    "BatchingSettings",
    "CoreState",
    "Engine",
    "EngineError",
    "EngineEvent",
    "EngineOverloadedError",
    "EngineRequest",
    "EngineUnavailableError",
    "FakeEngine",
    "FinishReason",
    "Finished",
    "InvalidRequestError",
    "ModelInfo",
    "Sampling",
    "TextDelta",
    "TokenLogprob",
    "Tokens",
    "TransformersEngine",
]
