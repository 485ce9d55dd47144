"""The installed `entity-llm` command against the installed server, as a user runs it."""

from __future__ import annotations

import json
import subprocess

import pytest

from entity_llm_client import LLMClient

from ..conftest import console_script

pytestmark = pytest.mark.e2e


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([console_script("entity-llm"), *args], capture_output=True, text=True, timeout=120)


def test_generate_streams_the_same_text_as_the_sdk(console_server):
    out = _cli("--target", console_server.target, "generate", "def fibonacci(n):", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    with LLMClient(console_server.target, timeout=60) as client:
        expected = client.complete("def fibonacci(n):", max_new_tokens=12)
    assert out.stdout == expected.text + "\n"
    assert f"[{expected.finish_reason.value}, {expected.usage.input_tokens} in / 12 out]" in out.stderr


def test_generate_json_gives_one_object_per_chunk_and_a_final_one(console_server):
    out = _cli("--target", console_server.target, "--json", "generate", "import os", "--max-new-tokens", "5",
               "--request-id", "cli-1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    chunks = [json.loads(line) for line in out.stdout.splitlines()]
    assert chunks[-1]["finish_reason"] == "max_tokens"
    assert chunks[-1]["usage"]["generated_tokens"] == 5
    assert {c["request_id"] for c in chunks} == {"cli-1"}
    assert all(c["finish_reason"] is None for c in chunks[:-1])


def test_tokenize_and_info(console_server):
    tokens = json.loads(_cli("--target", console_server.target, "--json", "tokenize", "def f(x):").stdout)
    assert tokens["count"] == len(tokens["ids"]) == len(tokens["pieces"]) > 0
    info = json.loads(_cli("--target", console_server.target, "--json", "info").stdout)
    assert info["default_max_new_tokens"] == 32  # the fixture's --max-new-tokens
    assert info["context_length"] > 0
    plain = _cli("--target", console_server.target, "info")
    assert "context_length:" in plain.stdout


def test_a_failed_call_exits_one_with_the_status(console_server):
    out = _cli("--target", console_server.target, "generate", "x", "--max-new-tokens", "0")
    assert out.returncode == 1
    assert "INVALID_ARGUMENT" in out.stderr
    assert "max_new_tokens" in out.stderr
    unreachable = _cli("--target", "127.0.0.1:1", "--timeout", "5", "info")
    assert unreachable.returncode == 1
    assert "UNAVAILABLE" in unreachable.stderr
