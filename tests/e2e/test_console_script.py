"""The installed `entity-llm-server` and `python -m entity_llm_server`, as an operator runs them."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading

import pytest

from entity_llm_client import AsyncLLMClient, FinishReason, LLMClient

from ..conftest import RunningServer, console_script
from .conftest import FIBONACCI, FIBONACCI_32, IMPORT_OS_8

pytestmark = pytest.mark.e2e


def test_console_script_streams_the_default_model_sync_and_async(console_server):
    with LLMClient(console_server.target, timeout=60) as client:
        text = "".join(c.text for c in client.generate(FIBONACCI))
    assert text == FIBONACCI_32  # the server's --max-new-tokens 32 of the greedy continuation

    async def run() -> str:
        async with AsyncLLMClient(console_server.target, timeout=60) as client:
            return "".join([c.text async for c in client.generate(FIBONACCI)])

    assert asyncio.run(run()) == FIBONACCI_32


@pytest.mark.parametrize("command", [["-m", "entity_llm_server"], []])
def test_help_documents_the_flags(command):
    argv = [sys.executable, *command, "--help"] if command else [console_script("entity-llm-server"), "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    for flag in ("--model", "--host", "--port", "--device", "--dtype", "--max-new-tokens", "ENTITY_LLM_"):
        assert flag in out


def test_python_dash_m_serves_too():
    argv = [sys.executable, "-m", "entity_llm_server", "--host", "127.0.0.1", "--port", "0", "--max-new-tokens", "8"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as server:
        try:
            line = server.stdout.readline()  # type: ignore[union-attr]
            target = line.split("listening on ")[1].strip()
            with LLMClient(target, timeout=60) as client:
                assert "".join(c.text for c in client.generate("import os\n")) == IMPORT_OS_8
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 0


def test_sigterm_mid_stream_lets_the_stream_finish_and_exits_zero():
    with (
        RunningServer("--max-new-tokens", "96", "--shutdown-grace", "30") as server,
        LLMClient(server.target, timeout=60) as client,
    ):
        stream = client.generate("class Parser:", min_new_tokens=96)  # never cut short by an EOS
        first = next(stream)
        # SIGTERM while the stream is open: it must still complete normally.
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        rest = list(stream)
        stopper.join(timeout=60)
        assert server.process.returncode == 0, server.stderr()
    assert first.text
    assert rest[-1].finish_reason is FinishReason.MAX_TOKENS
    assert rest[-1].usage is not None
    assert rest[-1].usage.generated_tokens == 96


def test_a_model_that_does_not_exist_fails_with_a_clear_message(tmp_path):
    out = subprocess.run(
        [console_script("entity-llm-server"), "--port", "0", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "cannot load model" in out.stderr
    assert str(tmp_path / "missing") in out.stderr
    assert "Traceback" not in out.stderr


def test_a_port_in_use_fails_with_a_clear_message(console_server):
    port = console_server.target.rsplit(":", 1)[1]
    out = subprocess.run(
        [console_script("entity-llm-server"), "--host", "127.0.0.1", "--port", port],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert f"127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_default_length_beyond_the_context_is_warned_about_and_reported_as_served():
    with RunningServer("--max-new-tokens", "100000") as server, LLMClient(server.target, timeout=60) as client:
        info = client.model_info()
        log = server.stderr()
    # The demo model's context is 512 tokens: a request without max_new_tokens gets at most 511.
    assert (info.default_max_new_tokens, info.max_max_new_tokens) == (511, 511)
    assert "--max-new-tokens 100000 is more than the model's 512-token context allows" in log


def test_a_clean_start_and_requests_log_nothing_at_warning_or_above():
    """The first thing a newcomer reads is the log: a clean run has no warning or error in it, ours or
    a library's (transformers once printed an ERROR about psutil)."""
    with RunningServer("--max-new-tokens", "8") as server:
        with LLMClient(server.target, timeout=60) as client:
            client.complete("def f(x):")
            client.complete(messages=[("system", "Answer in Python."), ("user", "Add two numbers.")])
            client.tokenize("def f(x):")
            client.model_info()
        assert server.stop() == 0
        log = server.stderr()
    loud = [
        line
        for line in log.splitlines()
        if any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Warning:", "Traceback"))
    ]
    assert loud == [], "\n".join(loud)
    assert "rpc finished" in log  # the log was read, and it is the access log's
