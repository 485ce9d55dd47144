"""`entity-llm generate`: every flag lands in its GenerateRequest field; unset ones stay unset.

The real entry point (`entity_llm_client.cli.main`) runs in process against a
capturing servicer, which reads the request with google-protobuf presence.
"""

from __future__ import annotations

import io
import json

import pytest

from entity_llm_client.cli import main

from .capturing import CapturingServicer, running
from .test_sdk_parameters import SamplesServicer

OPTIONAL_FIELDS = {
    "max_new_tokens",
    "min_new_tokens",
    "truncate_input_tokens",
    "time_limit_ms",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "n",
}


def _run(*args: str, servicer: CapturingServicer | None = None) -> tuple[CapturingServicer, int]:
    servicer = servicer or CapturingServicer()
    with running(servicer) as target:
        code = main(["--target", target, "--timeout", "30", *args])
    return servicer, code


def test_every_flag_lands_in_its_field():
    servicer, code = _run(
        "generate", "def f(x):",
        "--max-new-tokens", "9",
        "--min-new-tokens", "2",
        "--stop", "\n\n", "--stop", "#",
        "--include-stop-sequence",
        "--truncate-input-tokens", "64",
        "--time-limit-ms", "500",
        "--request-id", "cli-7",
        "--temperature", "0.5",
        "--top-p", "0.25",
        "--top-k", "40",
        "--repetition-penalty", "1.5",
        "--seed", "18446744073709551615",
        "--logprobs",
        "--top-logprobs", "3",
        "--n", "1",
    )  # fmt: skip
    assert code == 0
    (request,) = servicer.requests
    assert {name for name in OPTIONAL_FIELDS if request.HasField(name)} == OPTIONAL_FIELDS
    assert (request.prompt, list(request.messages)) == ("def f(x):", [])
    assert (request.max_new_tokens, request.min_new_tokens, request.truncate_input_tokens) == (9, 2, 64)
    assert (request.time_limit_ms, request.request_id) == (500, "cli-7")
    assert list(request.stop_sequences) == ["\n\n", "#"]
    assert request.include_stop_sequence
    assert (request.temperature, request.top_p, request.top_k, request.repetition_penalty) == (0.5, 0.25, 40, 1.5)
    assert request.seed == 2**64 - 1
    assert (request.logprobs, request.top_logprobs) == (True, 3)
    assert request.n == 1


def test_flags_left_out_stay_unset():
    servicer, code = _run("generate", "x")
    assert code == 0
    (request,) = servicer.requests
    assert not {name for name in OPTIONAL_FIELDS if request.HasField(name)}
    assert (request.prompt, request.logprobs, request.top_logprobs, request.include_stop_sequence) == ("x", 0, 0, 0)
    assert (list(request.stop_sequences), list(request.messages), request.request_id) == ([], [], "")


def test_each_sampling_flag_alone_sets_only_its_field():
    for flag, value, field in [
        ("--temperature", "0", "temperature"),
        ("--top-p", "0.5", "top_p"),
        ("--top-k", "0", "top_k"),
        ("--repetition-penalty", "1", "repetition_penalty"),
        ("--min-new-tokens", "0", "min_new_tokens"),
        ("--seed", "0", "seed"),
    ]:
        servicer, code = _run("generate", "x", flag, value)
        assert code == 0
        (request,) = servicer.requests
        assert {name for name in OPTIONAL_FIELDS if request.HasField(name)} == {field}, flag
        assert getattr(request, field) == float(value)


def test_message_flags_send_a_chat_in_order():
    servicer, code = _run("generate", "--message", "system:Be brief: very.", "--message", "user:Hi")
    assert code == 0
    (request,) = servicer.requests
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief: very."), ("user", "Hi")]
    assert request.prompt == ""


def test_messages_json_from_a_file_and_from_standard_input(tmp_path, monkeypatch):
    chat = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Add."}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(chat))
    from_file, code = _run("generate", "--messages-json", str(path))
    assert code == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(chat)))
    from_stdin, code = _run("generate", "--messages-json", "-")
    assert code == 0
    for servicer in (from_file, from_stdin):
        (request,) = servicer.requests
        assert [(m.role, m.content) for m in request.messages] == [(m["role"], m["content"]) for m in chat]


def test_json_output_includes_logprobs_and_seed(capsys):
    _, code = _run("--json", "generate", "x", "--logprobs")
    assert code == 0
    first, last = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["logprobs"] == [
        {
            "token_id": 1,
            "logprob": -0.5,
            "top_logprobs": [
                {"token_id": 1, "logprob": -0.5, "text": "H"},
                {"token_id": 7, "logprob": -1.5, "text": "J"},
            ],
        },
        {"token_id": 2, "logprob": -0.25, "top_logprobs": []},
    ]
    assert (first["seed"], last["seed"]) == (None, 2**64 - 1)
    assert last["logprobs"] == [{"token_id": 3, "logprob": -2.0, "top_logprobs": []}]
    assert last["finish_reason"] == "max_tokens"


def test_plain_output_reports_the_seed(capsys):
    _, code = _run("generate", "x")
    assert code == 0
    out, err = capsys.readouterr()
    assert out == "Hello\n"
    assert "[max_tokens, 4 in / 3 out, seed 18446744073709551615]" in err


def test_n_above_one_prints_each_sample_under_a_header_once_all_end(capsys):
    servicer, code = _run("generate", "x", "--n", "3", "--seed", "7", servicer=SamplesServicer())
    assert code == 0
    (request,) = servicer.requests
    assert (request.prompt, request.n, request.seed) == ("x", 3, 7)
    out, err = capsys.readouterr()
    assert out == (
        "--- sample 0 (max_tokens, 5 in / 3 out, seed 7) ---\n"
        "a0a1a2\n"
        "--- sample 1 (stop_token, 5 in / 2 out, seed 1007) ---\n"
        "b0b1\n"
        "--- sample 2 (eos, 5 in / 2 out, seed 2007) ---\n"
        "c0c1\n"
    )
    assert err == ""


def test_n_above_one_with_json_prints_one_array_of_samples(capsys):
    servicer, code = _run("--json", "generate", "x", "--n", "2", "--logprobs", servicer=SamplesServicer())
    assert code == 0
    assert servicer.requests[0].n == 2
    (line,) = capsys.readouterr().out.splitlines()
    first, second = json.loads(line)
    assert first == {
        "text": "a0a1a2",
        "token_ids": [10, 11, 12],
        "finish_reason": "max_tokens",
        "usage": {"input_tokens": 5, "generated_tokens": 3, "cached_tokens": 2},
        "stop_sequence": "",
        "request_id": "r-9",
        "logprobs": [{"token_id": i, "logprob": -0.25, "top_logprobs": []} for i in (10, 11, 12)],
        "seed": None,
        "stop_token_id": None,
    }
    assert (second["text"], second["finish_reason"], second["stop_token_id"]) == ("b0b1", "stop_token", 21)
    assert second["usage"] == {"input_tokens": 5, "generated_tokens": 2, "cached_tokens": 4}


def test_n_of_one_streams_as_without_it(capsys):
    servicer, code = _run("generate", "x", "--n", "1", servicer=SamplesServicer())
    assert code == 0
    assert servicer.requests[0].n == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("a0a1a2\n", "[max_tokens, 5 in / 3 out]\n")
    _, code = _run("--json", "generate", "x", "--n", "1", servicer=SamplesServicer())
    assert code == 0
    chunks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(c["index"], c["text"]) for c in chunks] == [(0, "a0"), (0, "a1"), (0, "a2")]
    assert chunks[-1]["usage"] == {"input_tokens": 5, "generated_tokens": 3, "cached_tokens": 2}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate",), "exactly one"),
        (("generate", "x", "--message", "user:Hi"), "exactly one"),
        (("generate", "--message", "no-role-separator"), "ROLE:CONTENT"),
        (("generate", "--messages-json", "/nonexistent/chat.json"), "No such file"),
        (("generate", "x", "--top-k", "-1"), "top_k"),
        (("generate", "x", "--temperature", "1e39"), "temperature"),  # was a traceback
        (("generate", "x", "--n", "-1"), "n must be between"),
        (("generate", "x", "--n", "4294967296"), "n must be between"),  # through samples(), before its call
        (("generate", "x", "--n", "two"), "invalid int value"),
        # Bytes that are not UTF-8 reach argv as lone surrogates: was INTERNAL from the server.
        (("tokenize", "\udcff\udcfe"), "text"),
    ],
)
def test_bad_flags_exit_two_before_any_call(args, message, capsys):
    servicer = CapturingServicer()
    with running(servicer) as target, pytest.raises(SystemExit) as exited:
        main(["--target", target, *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert servicer.deadlines == []  # no call of any method arrived
