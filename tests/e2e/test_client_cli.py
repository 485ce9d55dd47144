"""The installed `entity-llm` command against the installed server, as a user runs it.

Flags the demo model cannot show (where a stop token ends the stream, and the
output of several samples, shown exactly) go to a capturing servicer instead,
which reads the request as any server would.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator

import pytest

from entity_llm_client import LLMClient
from entity_llm_server._gen.entity.grpc import llm_pb2

from ..conftest import console_script
from ..integration.capturing import CapturingServicer, Context, running
from ..integration.test_sdk_parameters import SamplesServicer
from .conftest import FIBONACCI, FIBONACCI_12

pytestmark = pytest.mark.e2e


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([console_script("entity-llm"), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.model  # the console server loads the default model
def test_generate_streams_the_same_text_as_the_sdk(console_server):
    out = _cli("--target", console_server.target, "generate", FIBONACCI, "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    with LLMClient(console_server.target, timeout=60) as client:
        expected = client.complete(FIBONACCI, max_new_tokens=12)
    assert expected.text == FIBONACCI_12
    assert out.stdout == FIBONACCI_12 + "\n"
    assert "[max_tokens, 10 in / 12 out]" in out.stderr  # the start token and 9 of the prompt


@pytest.mark.model  # the console server loads the default model
def test_generate_json_gives_one_object_per_chunk_and_a_final_one(console_server):
    out = _cli("--target", console_server.target, "--json", "generate", "import os", "--max-new-tokens", "5",
               "--request-id", "cli-1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    chunks = [json.loads(line) for line in out.stdout.splitlines()]
    assert "".join(c["text"] for c in chunks) == "\nimport os\nimport"  # greedy
    assert chunks[-1]["finish_reason"] == "max_tokens"
    assert chunks[-1]["usage"]["generated_tokens"] == 5
    assert {c["request_id"] for c in chunks} == {"cli-1"}
    assert all(c["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.model  # the console server loads the default model
def test_tokenize_and_info(console_server):
    tokens = json.loads(_cli("--target", console_server.target, "--json", "tokenize", "def f(x):").stdout)
    assert tokens == {
        "ids": [0, 319, 290, 11, 91, 304],
        "pieces": ["<|endoftext|>", "def", "\u0120f", "(", "x", "):"],  # byte-level BPE: "\u0120" is a space
        "count": 6,
    }
    info = json.loads(_cli("--target", console_server.target, "--json", "info").stdout)
    assert info["default_max_new_tokens"] == 32  # the fixture's --max-new-tokens
    assert (info["context_length"], info["vocab_size"], info["max_max_new_tokens"]) == (512, 4096, 511)
    assert (info["eos_token_ids"], info["has_chat_template"]) == ([0], True)
    assert info["engine"] == "batching"  # the default model runs under continuous batching
    plain = _cli("--target", console_server.target, "info").stdout.splitlines()
    assert "context_length: 512" in plain
    assert "default_max_new_tokens: 32" in plain
    assert "eos_token_ids: 0" in plain  # not a Python tuple's repr
    assert "constraint_kinds: json_schema, json_object, regex, choice, grammar" in plain


@pytest.mark.model  # the console server loads the default model
def test_a_failed_call_exits_one_with_the_status(console_server):
    out = _cli("--target", console_server.target, "generate", "x", "--max-new-tokens", "0")
    assert out.returncode == 1
    assert out.stderr == (
        "entity-llm: INVALID_ARGUMENT: invalid request: max_new_tokens: must be at least 1 when set "
        "(0 only with prompt_logprobs, to score the prompt)\n"
    )
    unreachable = _cli("--target", "127.0.0.1:1", "--timeout", "5", "info")
    assert unreachable.returncode == 1
    assert "UNAVAILABLE" in unreachable.stderr


@pytest.mark.model  # the console server loads the default model
def test_score_and_prompt_logprobs_give_the_sdks_numbers(console_server):
    target = console_server.target
    out = _cli("--target", target, "--json", "score", "def f(x):", "--top-logprobs", "2")
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)
    assert [e["token_id"] for e in entries] == [319, 290, 11, 91, 304]  # the prompt's tokens after its start token
    for entry in entries:
        assert len(entry["top_logprobs"]) == 2
        assert entry["rank"] >= 1
        assert (entry["rank"] == 1) == (entry["logprob"] == entry["top_logprobs"][0]["logprob"])
    with LLMClient(target, timeout=60) as client:
        expected = client.score("def f(x):", top_logprobs=2)
        done = client.complete("def f(x):", max_new_tokens=3, prompt_logprobs=0, logprobs=True)
    assert [(e.token_id, e.logprob, e.rank) for e in expected] == [
        (e["token_id"], e["logprob"], e["rank"]) for e in entries
    ]
    assert [(e.token_id, e.rank) for e in done.prompt_logprobs] == [(e.token_id, e.rank) for e in expected]
    assert [e.rank for e in done.logprobs] == [1, 1, 1]  # greedy: the likeliest token each step
    plain = _cli("--target", target, "generate", "def f(x):", "--max-new-tokens", "0", "--prompt-logprobs", "0")
    assert plain.returncode == 0, plain.stderr
    blank, header, *rows = plain.stdout.splitlines()
    assert blank == ""
    assert header == f"--- prompt logprobs (5 tokens after the first, sum {sum(e.logprob for e in expected):.4f}) ---"
    assert [row.split()[0] for row in rows] == ["319", "290", "11", "91", "304"]
    assert "[max_tokens, 6 in / 0 out]" in plain.stderr


@pytest.mark.model  # the console server loads the default model
def test_generate_takes_a_constraint_from_flags_and_files(console_server, tmp_path):
    schema = tmp_path / "pet.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                                  "required": ["kind"], "additionalProperties": False}))  # fmt: skip
    out = _cli("--target", console_server.target, "generate", "A pet: ", "--json-schema", str(schema))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["kind"] in ("cat", "dog")
    assert "[eos," in out.stderr
    out = _cli("--target", console_server.target, "generate", "A: ", "--choice", "yes", "--choice", "no")
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    # One constraint at most: the flags say so before any call.
    out = _cli("--target", console_server.target, "generate", "A: ", "--regex", "a+", "--choice", "a")
    assert out.returncode == 2
    assert "not allowed with argument" in out.stderr
    # One the server cannot compile: the status and the field.
    out = _cli("--target", console_server.target, "generate", "A: ", "--regex", "a(")
    assert out.returncode == 1
    assert "INVALID_ARGUMENT" in out.stderr
    assert "regex" in out.stderr


class StopTokenServicer(CapturingServicer):
    """Ends every stream on stop token 304 ("):" in the demo model's vocabulary)."""

    async def reply(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        yield llm_pb2.GenerateResponse(
            token="x):",
            token_ids=[91, 304],
            finish_reason=llm_pb2.FINISH_REASON_STOP_TOKEN,
            stop_token_id=304,
            input_token_count=3,
            generated_token_count=2,
            request_id="r-3",
        )


def test_generate_sends_token_ids_stop_tokens_and_logit_flags():
    servicer = StopTokenServicer()
    with running(servicer) as target:
        out = _cli("--target", target, "--json", "generate", "--prompt-token-ids", "319,290,11",
                   "--stop-token-id", "304", "--stop-token-id", "4294967295", "--ignore-eos",
                   "--min-p", "0.125", "--typical-p", "0.75", "--presence-penalty", "-0.5",
                   "--frequency-penalty", "1.25", "--logit-bias", "0=-100", "--logit-bias", "7=2.5")  # fmt: skip
    assert out.returncode == 0, out.stderr
    (request,) = servicer.requests
    assert (list(request.prompt_token_ids), request.prompt, list(request.messages)) == ([319, 290, 11], "", [])
    assert (list(request.stop_token_ids), request.ignore_eos) == ([304, 2**32 - 1], True)
    assert (request.min_p, request.typical_p, request.presence_penalty, request.frequency_penalty) == (
        0.125, 0.75, -0.5, 1.25
    )  # fmt: skip
    assert dict(request.logit_bias) == {0: -100.0, 7: 2.5}
    (chunk,) = (json.loads(line) for line in out.stdout.splitlines())
    assert (chunk["finish_reason"], chunk["stop_token_id"], chunk["token_ids"]) == ("stop_token", 304, [91, 304])


def test_generate_n_prints_every_sample_under_its_header():
    servicer = SamplesServicer()
    with running(servicer) as target:
        out = _cli("--target", target, "generate", "x", "--n", "2", "--seed", "7")
    assert out.returncode == 0, out.stderr
    (request,) = servicer.requests
    assert (request.n, request.seed) == (2, 7)
    assert out.stdout.splitlines() == [
        "--- sample 0 (max_tokens, 5 in / 3 out, seed 7) ---",
        "a0a1a2",
        "--- sample 1 (stop_token, 5 in / 2 out, seed 1007) ---",
        "b0b1",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("x", "--prompt-token-ids", "1"), "exactly one"),
        (("--prompt-token-ids", "1,x"), "--prompt-token-ids: expected token ids"),
        (("x", "--logit-bias", "5"), "--logit-bias: expected ID=BIAS"),
        (("x", "--stop-token-id", "-1"), "stop_token_ids[0]"),  # the SDK's check, before any call
    ],
)
def test_bad_token_flags_exit_two_before_any_call(args, message):
    servicer = CapturingServicer()
    with running(servicer) as target:
        out = _cli("--target", target, "generate", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert servicer.deadlines == []  # no call of any method arrived
