"""e2e fixtures: the installed console script, started as a user starts it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ..conftest import RunningServer

pytestmark = pytest.mark.e2e

# The demo model's greedy continuations: deterministic, on every engine (tests/model checks them
# against transformers' generate). FIBONACCI_GREEDY is the docs' (docs/server.md): 51 tokens, then its EOS.
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


# The console script's own `serve()`, in a process of its own: once it has answered one Generate (a
# prompt, or with "chat" a chat) through a plain grpc stub (not the client SDK, which imports
# OpenTelemetry's API when it is installed), it reports on itself as JSON on stderr and stops.
INSPECTED = """
import asyncio, gc, io, json, re, signal, sys, threading
import grpc
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.config import parse_config
from entity_llm_server.server import serve

def rss_mib():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

def call(port):
    if sys.argv[1] == "chat":
        request = llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="user", content="Add two numbers.")])
    else:
        request = llm_pb2.GenerateRequest(prompt="def f(x):")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return list(llm_pb2_grpc.LLMServiceStub(channel).Generate(request, timeout=60))[-1].generated_token_count

async def main():
    ready = asyncio.Event()
    config = parse_config(["--host", "127.0.0.1", "--port", "0", "--max-new-tokens", "8"], env={})
    served = asyncio.create_task(serve(config, ready=ready))
    await ready.wait()
    port = re.search(r"listening on \\S+:(\\d+)", sys.stdout.getvalue()).group(1)
    before = rss_mib()
    tokens = await asyncio.to_thread(call, port)
    report = {
        "tokens": tokens,
        "threads": sorted(t.name for t in threading.enumerate()),
        "packages": sorted({name.partition(".")[0] for name in sys.modules}),
        "rss_mib": [round(before), round(rss_mib())],
        "frozen": gc.get_freeze_count(),
    }
    print("report", json.dumps(report), file=sys.stderr)
    signal.raise_signal(signal.SIGTERM)
    return await served

sys.stdout = io.StringIO()  # serve() prints the port there
sys.exit(asyncio.run(main()))
"""


def inspect_serving(request: str, env: dict[str, str]) -> dict[str, Any]:
    """What the serving process holds after one Generate (`request`: "prompt" or "chat"): the
    tokens it generated, its thread names, its top-level packages and its RSS before and after."""
    out = subprocess.run(
        [sys.executable, "-c", INSPECTED, request], capture_output=True, text=True, timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (report,) = [line.removeprefix("report ") for line in out.stderr.splitlines() if line.startswith("report ")]
    return dict(json.loads(report))
