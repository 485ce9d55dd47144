"""Compatibility alias: the seed's `LLMService` and `UnifiedLLMResource`."""

from entity_llm_server.resource import UnifiedLLMResource
from entity_llm_server.service import LLMService

__all__ = ["LLMService", "UnifiedLLMResource"]
