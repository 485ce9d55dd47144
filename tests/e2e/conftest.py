"""e2e fixtures: the installed console script, started as a user starts it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..conftest import RunningServer

pytestmark = pytest.mark.e2e

# The demo model's greedy continuations: deterministic, on every engine (tests/model checks them
# against transformers' generate). FIBONACCI_GREEDY is the README's: 51 tokens, then its EOS.
FIBONACCI = "def fibonacci(n):"
FIBONACCI_GREEDY = (
    ' return fibonic (but not in the case).\n\ndef fibonic(n):\n    """Return a fibonic (but not in the case).\n'
    '    """\n    return _fibonic(n)'
)
FIBONACCI_12 = " return fibonic (but not in the case"  # its first 12 tokens
FIBONACCI_32 = ' return fibonic (but not in the case).\n\ndef fibonic(n):\n    """Return a fibonic ('  # its first 32
IMPORT_OS_8 = "import os\nimport os\nimport os"  # "import os\n", 8 tokens


@pytest.fixture(scope="session")
def console_server() -> Iterator[RunningServer]:
    """`entity-llm-server` on the embedded default model, shared by the session."""
    with RunningServer("--max-new-tokens", "32") as server:
        yield server
        assert server.stop() == 0, server.stderr()
