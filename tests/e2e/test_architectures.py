"""The console script on a model continuous batching cannot run, as a user meets it."""

from __future__ import annotations

import subprocess

import pytest

from entity_llm_client import LLMClient

from ..architectures import generate_ids
from ..conftest import RunningServer, console_script

pytestmark = pytest.mark.e2e


def test_by_default_the_server_serves_it_in_padded_batches_and_says_so(tiny_model):
    folder = tiny_model("gpt_neox")
    with RunningServer("--model", str(folder)) as server, LLMClient(server.target, timeout=60) as client:
        info = client.model_info()
        completion = client.complete("def f(x):", max_new_tokens=8)
        log = server.stderr()
    assert info.engine == "padded"
    assert completion.token_ids == generate_ids(folder, "def f(x):", 8)
    assert "continuous batching cannot run GPTNeoXForCausalLM" in log
    assert "(padded engine;" in log  # the start-up line says which engine serves


def test_with_engine_batching_it_exits_non_zero_saying_why(tiny_model):
    folder = tiny_model("gpt_neox")
    argv = [console_script("entity-llm-server"), "--host", "127.0.0.1", "--port", "0", "--model", str(folder)]
    ended = subprocess.run([*argv, "--engine", "batching"], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 2
    assert "listening" not in ended.stdout  # never SERVING
    assert "continuous batching cannot run GPTNeoXForCausalLM: " in ended.stderr
