"""entity-llm-server: serve a Hugging Face causal LM over gRPC.

Importing this package loads no model and imports no torch.
"""

from __future__ import annotations

from .config import ServerConfig, parse_config
from .engine import BatchingEngine, BatchingSettings, Engine, EngineRequest, TransformersEngine
from .resource import UnifiedLLMResource, default_model_path
from .server import LLMServer, build_server, serve
from .service import LLMService

__all__ = [
    "BatchingEngine",
    "BatchingSettings",
    "Engine",
    "EngineRequest",
    "LLMServer",
    "LLMService",
    "ServerConfig",
    "TransformersEngine",
    "UnifiedLLMResource",
    "build_server",
    "default_model_path",
    "parse_config",
    "serve",
]
