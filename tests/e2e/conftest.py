"""e2e fixtures: the installed console script, started as a user starts it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..conftest import RunningServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def console_server() -> Iterator[RunningServer]:
    """`entity-llm-server` on the embedded default model, shared by the session."""
    with RunningServer("--max-new-tokens", "32") as server:
        yield server
        assert server.stop() == 0, server.stderr()
