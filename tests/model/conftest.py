"""Model-tier fixtures: the embedded default model, loaded once per session."""

from __future__ import annotations

import pytest

from entity_llm_server import UnifiedLLMResource


@pytest.fixture(scope="session")
def demo_engine():
    """The default engine (continuous batching, in process) on the embedded default model (not started)."""
    return UnifiedLLMResource(default_max_new_tokens=24).load_engine()
