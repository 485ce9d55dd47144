"""Engines: the seam between the gRPC servicer and a model."""

from __future__ import annotations

from .base import (
    Engine,
    EngineError,
    EngineEvent,
    EngineRequest,
    Finished,
    FinishReason,
    InvalidRequestError,
    TextDelta,
)
from .fake import FakeEngine
from .transformers_engine import TransformersEngine

__all__ = [
    "Engine",
    "EngineError",
    "EngineEvent",
    "EngineRequest",
    "FakeEngine",
    "FinishReason",
    "Finished",
    "InvalidRequestError",
    "TextDelta",
    "TransformersEngine",
]
