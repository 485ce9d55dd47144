"""Engines: the seam between the gRPC servicer and a model.

An engine is a front end (`frontend.FrontEnd`: tokenizing, admission,
detokenizing, stop sequences) over a core that runs the model (`core.Core`):
continuous batching in this process (`BatchingEngine`) or in an engine process
of its own (`process.ProcessEngine`), padded batches on the model's own cache
for models continuous batching cannot run (`PaddedEngine`), or one request at
a time (`TransformersEngine`).
"""

from __future__ import annotations

from .base import (
    DEFAULT_MAX_NEW_TOKENS,
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
    Scored,
    TextDelta,
    Tokens,
)
from .batching import BatchingEngine
from .frontend import FrontEnd
from .padded import PaddedEngine
from .sampling import Sampling, TokenLogprob
from .sequential import TransformersEngine
from .settings import BatchingSettings

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "BatchingEngine",
    "BatchingSettings",
    "CoreState",
    "Engine",
    "EngineError",
    "EngineEvent",
    "EngineOverloadedError",
    "EngineRequest",
    "EngineUnavailableError",
    "FinishReason",
    "Finished",
    "FrontEnd",
    "InvalidRequestError",
    "ModelInfo",
    "PaddedEngine",
    "Sampling",
    "Scored",
    "TextDelta",
    "TokenLogprob",
    "Tokens",
    "TransformersEngine",
]
