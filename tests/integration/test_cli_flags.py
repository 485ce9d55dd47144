"""`entity-llm generate`: every flag lands in its GenerateRequest field; unset ones stay unset.

The real entry point (`entity_llm_client.cli.main`) runs in process against a
capturing servicer, which reads the request with google-protobuf presence.
"""

from __future__ import annotations

import io
import json

import pytest

from entity_llm_client.cli import main

from .capturing import CapturingServicer, ScoringServicer, running
from .test_sdk_parameters import SamplesServicer
from .test_sdk_scoring import ScoringSamplesServicer

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
    "prompt_logprobs",
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
        "--prompt-logprobs", "10",
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
    assert (request.n, request.prompt_logprobs) == (1, 10)


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
        ("--prompt-logprobs", "0", "prompt_logprobs"),
        ("--max-new-tokens", "0", "max_new_tokens"),  # the server's to refuse without --prompt-logprobs
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
            "rank": 1,
        },
        {"token_id": 2, "logprob": -0.25, "top_logprobs": [], "rank": 2},
    ]
    assert (first["seed"], last["seed"]) == (None, 2**64 - 1)
    assert last["logprobs"] == [{"token_id": 3, "logprob": -2.0, "top_logprobs": [], "rank": 4096}]
    assert first["prompt_logprobs"] == last["prompt_logprobs"] == []
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
        "logprobs": [{"token_id": i, "logprob": -0.25, "top_logprobs": [], "rank": 0} for i in (10, 11, 12)],
        "seed": None,
        "stop_token_id": None,
        "prompt_logprobs": [],
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


PROMPT_TABLE = [
    "--- prompt logprobs (3 tokens after the first, sum -4.7500) ---",
    "      11    -1.5000  rank 2  [12 'b' -0.2500, 11 'a' -1.5000]",
    "      12    -0.2500  rank 1  [12 'b' -0.2500, 13 'c' -3.0000]",
    "      13    -3.0000  rank 7  [42 ' z' -0.1250, 43 '\u00e9' -0.5000]",
]


def test_prompt_logprobs_print_after_the_text_one_token_a_line(capsys):
    servicer, code = _run("generate", "x", "--prompt-logprobs", "2", servicer=ScoringServicer())
    assert code == 0
    (request,) = servicer.requests
    assert (request.prompt_logprobs, request.HasField("max_new_tokens")) == (2, False)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["Hello", *PROMPT_TABLE]
    assert err == "[max_tokens, 4 in / 3 out, seed 18446744073709551615]\n"


def test_max_new_tokens_zero_with_prompt_logprobs_only_scores(capsys):
    servicer = ScoringServicer()
    _, code = _run("generate", "x", "--max-new-tokens", "0", "--prompt-logprobs", "0", servicer=servicer)
    assert code == 0
    (request,) = servicer.requests
    assert (request.max_new_tokens, request.prompt_logprobs) == (0, 0)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["", PROMPT_TABLE[0], "      11    -1.5000  rank 2", "      12    -0.2500  rank 1",
                                "      13    -3.0000  rank 7"]  # fmt: skip
    assert err == "[max_tokens, 4 in / 0 out]\n"


def test_prompt_logprobs_with_json_come_in_the_first_chunk(capsys):
    _, code = _run("--json", "generate", "x", "--prompt-logprobs", "1", servicer=ScoringServicer())
    assert code == 0
    first, *rest = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (first["text"], first["token_ids"], first["finish_reason"]) == ("", [], None)
    b, z = {"token_id": 12, "logprob": -0.25, "text": "b"}, {"token_id": 42, "logprob": -0.125, "text": " z"}
    assert first["prompt_logprobs"] == [
        {"token_id": 11, "logprob": -1.5, "top_logprobs": [b], "rank": 2},
        {"token_id": 12, "logprob": -0.25, "top_logprobs": [b], "rank": 1},
        {"token_id": 13, "logprob": -3.0, "top_logprobs": [z], "rank": 7},
    ]
    assert [(c["text"], c["prompt_logprobs"]) for c in rest] == [("He", []), ("llo", [])]


def test_samples_print_sample_0s_prompt_logprobs_after_them(capsys):
    servicer, code = _run("generate", "x", "--n", "2", "--prompt-logprobs", "2", servicer=ScoringSamplesServicer())
    assert code == 0
    assert (servicer.requests[0].n, servicer.requests[0].prompt_logprobs) == (2, 2)
    assert capsys.readouterr().out.splitlines() == [
        "--- sample 0 (max_tokens, 5 in / 3 out) ---",
        "a0a1a2",
        "--- sample 1 (stop_token, 5 in / 2 out) ---",
        "b0b1",
        *PROMPT_TABLE,
    ]
    _, code = _run("--json", "generate", "x", "--n", "2", "--prompt-logprobs", "0", servicer=ScoringSamplesServicer())
    assert code == 0
    first, second = json.loads(capsys.readouterr().out)
    assert [(e["token_id"], e["rank"], e["top_logprobs"]) for e in first["prompt_logprobs"]] == [
        (11, 2, []),
        (12, 1, []),
        (13, 7, []),
    ]
    assert (first["text"], second["text"], second["prompt_logprobs"]) == ("a0a1a2", "b0b1", [])


def test_score_sends_only_a_scoring_request_and_prints_the_table(capsys):
    servicer, code = _run("score", "The capital of France is Paris", "--top-logprobs", "2", servicer=ScoringServicer())
    assert code == 0
    out, err = capsys.readouterr()
    assert (out.splitlines(), err) == (PROMPT_TABLE, "")
    _, code = _run("--json", "score", "--prompt-token-ids", "5,11,12,13", "--truncate-input-tokens", "3",
                   servicer=servicer)  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out) == [
        {"token_id": 11, "logprob": -1.5, "top_logprobs": [], "rank": 2},
        {"token_id": 12, "logprob": -0.25, "top_logprobs": [], "rank": 1},
        {"token_id": 13, "logprob": -3.0, "top_logprobs": [], "rank": 7},
    ]
    _, code = _run("score", "--message", "user:Hi", servicer=servicer)
    assert code == 0
    text, ids, chat = servicer.requests
    assert (text.prompt, text.max_new_tokens, text.prompt_logprobs) == ("The capital of France is Paris", 0, 2)
    assert not text.HasField("truncate_input_tokens")
    assert (list(ids.prompt_token_ids), ids.max_new_tokens, ids.prompt_logprobs) == ([5, 11, 12, 13], 0, 0)
    assert ids.truncate_input_tokens == 3
    assert ([(m.role, m.content) for m in chat.messages], chat.max_new_tokens, chat.prompt_logprobs) == (
        [("user", "Hi")], 0, 0
    )  # fmt: skip
    scoring = {"max_new_tokens", "prompt_logprobs"}
    assert [{name for name in OPTIONAL_FIELDS if request.HasField(name)} for request in servicer.requests] == [
        scoring,
        {*scoring, "truncate_input_tokens"},
        scoring,
    ]


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
        (("generate", "x", "--prompt-logprobs", "-1"), "prompt_logprobs must be between"),
        (("generate", "x", "--n", "2", "--prompt-logprobs", "-1"), "prompt_logprobs must be between"),
        (("score",), "score: give a prompt"),
        (("score", "x", "--message", "user:Hi"), "exactly one"),
        (("score", "x", "--top-logprobs", "-1"), "top_logprobs must be between"),
        (("score", "--prompt-token-ids", "1,x"), "--prompt-token-ids: expected token ids"),
        (("score", "x", "--max-new-tokens", "3"), "unrecognized arguments"),
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


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--json", "generate", "x"], True),
        (["generate", "x", "--json"], True),  # after the command: not an abbreviation of --json-schema
        (["generate", "x"], False),
        (["score", "x", "--json"], True),
        (["tokenize", "x", "--json"], True),
        (["info", "--json"], True),
    ],
)
def test_json_is_taken_before_or_after_the_command(argv, expected):
    from entity_llm_client.cli import build_parser

    assert build_parser().parse_args(argv).json is expected
