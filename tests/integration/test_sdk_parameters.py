"""What the SDK puts on the wire for each parameter, and what it makes of logprobs and seeds.

A capturing servicer decodes the requests with the server's google-protobuf
messages, so presence is checked as a server sees it.
"""

from __future__ import annotations

import asyncio

import pytest

from entity_llm_client import AsyncLLMClient, Completion, FinishReason, LLMClient, TokenLogprob, TopLogprob, Usage

from .capturing import CapturingServicer, running

OPTIONAL_FIELDS = (
    "max_new_tokens",
    "truncate_input_tokens",
    "time_limit_ms",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "min_new_tokens",
    "seed",
)

EXPECTED_LOGPROBS = (
    TokenLogprob(1, -0.5, (TopLogprob(1, -0.5, "H"), TopLogprob(7, -1.5, "J"))),
    TokenLogprob(2, -0.25),
    TokenLogprob(3, -2.0),
)


def test_every_parameter_lands_in_its_field():
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        client.complete(
            "def f(x):",
            max_new_tokens=9,
            min_new_tokens=3,
            stop_sequences=("\n\n", "#"),
            include_stop_sequence=True,
            truncate_input_tokens=100,
            time_limit_ms=1500,
            temperature=0.5,
            top_p=0.25,
            top_k=40,
            repetition_penalty=1.5,
            seed=2**64 - 1,
            logprobs=True,
            top_logprobs=2,
            request_id="job-1",
        )
    (request,) = servicer.requests
    assert all(request.HasField(name) for name in OPTIONAL_FIELDS)
    assert request.prompt == "def f(x):"
    assert not request.messages
    assert (request.max_new_tokens, request.min_new_tokens, request.truncate_input_tokens) == (9, 3, 100)
    assert (request.time_limit_ms, request.top_k, request.seed) == (1500, 40, 2**64 - 1)
    assert (request.temperature, request.top_p, request.repetition_penalty) == (0.5, 0.25, 1.5)
    assert list(request.stop_sequences) == ["\n\n", "#"]
    assert request.include_stop_sequence
    assert (request.logprobs, request.top_logprobs, request.request_id) == (True, 2, "job-1")


def test_unset_parameters_stay_unset_and_zero_is_sent_when_given():
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        client.complete("x")
        client.complete("x", temperature=0.0, seed=0, top_k=0, max_new_tokens=None)
        nones = ("logprobs", "top_logprobs", "stop_sequences", "request_id", "include_stop_sequence")
        client.complete("x", **dict.fromkeys((*OPTIONAL_FIELDS, *nones)))
    bare, zeros, all_none = servicer.requests
    assert bare == all_none
    assert not [name for name in OPTIONAL_FIELDS if bare.HasField(name)]
    assert (bare.logprobs, bare.top_logprobs, list(bare.stop_sequences), bare.request_id) == (False, 0, [], "")
    assert [name for name in OPTIONAL_FIELDS if zeros.HasField(name)] == ["temperature", "top_k", "seed"]
    assert (zeros.temperature, zeros.top_k, zeros.seed) == (0.0, 0, 0)


def test_messages_replace_the_prompt():
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        client.complete(messages=[("system", "Be brief."), ("user", "Hi")], temperature=0.5)
    (request,) = servicer.requests
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert request.prompt == ""
    assert request.temperature == 0.5


def test_chunks_carry_logprobs_and_the_last_one_the_seed():
    with running(CapturingServicer()) as target, LLMClient(target, timeout=10) as client:
        chunks = list(client.generate("x", logprobs=True, top_logprobs=2))
    assert [c.logprobs for c in chunks] == [EXPECTED_LOGPROBS[:2], EXPECTED_LOGPROBS[2:]]
    assert [c.seed for c in chunks] == [None, 2**64 - 1]
    assert [c.token_ids for c in chunks] == [(1, 2), (3,)]


def test_the_completion_concatenates_logprobs_and_keeps_the_seed():
    with running(CapturingServicer()) as target, LLMClient(target, timeout=10) as client:
        done = client.complete("x", logprobs=True)
    assert done == Completion(
        text="Hello",
        token_ids=(1, 2, 3),
        finish_reason=FinishReason.MAX_TOKENS,
        usage=Usage(4, 3),
        request_id="r-1",
        logprobs=EXPECTED_LOGPROBS,
        seed=2**64 - 1,
    )


def test_the_async_client_sends_and_reads_the_same():
    servicer = CapturingServicer()

    async def run() -> tuple[Completion, list[int | None]]:
        async with AsyncLLMClient(target, timeout=10) as client:
            done = await client.complete(messages=[("user", "Hi")], top_p=0.25, seed=7, logprobs=True)
            seeds = [chunk.seed async for chunk in client.generate("x", top_logprobs=1)]
            return done, seeds

    with running(servicer) as target:
        done, seeds = asyncio.run(run())
    chat, plain = servicer.requests
    assert [(m.role, m.content) for m in chat.messages] == [("user", "Hi")]
    assert (chat.top_p, chat.seed, chat.logprobs) == (0.25, 7, True)
    assert not chat.HasField("temperature")
    assert (plain.prompt, plain.top_logprobs, plain.logprobs) == ("x", 1, False)
    assert (done.logprobs, done.seed) == (EXPECTED_LOGPROBS, 2**64 - 1)
    assert seeds == [None, 2**64 - 1]


BAD_CALLS = [
    pytest.param((), {}, TypeError, "exactly one", id="neither"),
    pytest.param(("x",), {"messages": [("user", "Hi")]}, TypeError, "exactly one", id="both"),
    pytest.param((), {"messages": []}, ValueError, "at least one", id="no-messages"),
    pytest.param((), {"messages": [{"role": "user", "content": "Hi"}]}, TypeError, r"messages\[0\]", id="dict"),
    pytest.param((), {"messages": [("user", "Hi", "x")]}, TypeError, r"messages\[0\]", id="triple"),
    pytest.param(("x",), {"temprature": 0.5}, TypeError, "temprature", id="unknown-option"),
    pytest.param(("x",), {"top_k": -1}, ValueError, "top_k", id="negative"),
    pytest.param(("x",), {"seed": 2**64}, ValueError, "seed", id="seed-too-big"),
    pytest.param(("x",), {"stop_sequences": "\n"}, TypeError, "stop_sequences", id="stop-as-str"),
    # Values the wire cannot carry: each once went out and came back as
    # grpcio's INTERNAL "Exception serializing request!", not even an LLMError.
    pytest.param(("x",), {"temperature": 1e39}, ValueError, "temperature", id="float32-overflow"),
    pytest.param(("x",), {"top_p": 10**400}, ValueError, "top_p", id="int-beyond-float"),
    pytest.param(("x",), {"max_new_tokens": 1.5}, TypeError, "max_new_tokens", id="float-for-uint"),
    pytest.param(("x",), {"max_new_tokens": "5"}, TypeError, "max_new_tokens", id="str-for-uint"),
    pytest.param(("x",), {"temperature": "0.5"}, TypeError, "temperature", id="str-for-float"),
    pytest.param(("a\ud800b",), {}, ValueError, "prompt", id="lone-surrogate"),
    pytest.param((), {"messages": [("user", "\udfff")]}, ValueError, r"messages\[0\]\.content", id="surrogate-chat"),
    pytest.param(("x",), {"stop_sequences": ["\ud800"]}, ValueError, r"stop_sequences\[0\]", id="surrogate-stop"),
    pytest.param(("x",), {"request_id": 7}, TypeError, "request_id", id="int-request-id"),
    pytest.param(("x",), {"logprobs": "yes"}, TypeError, "logprobs", id="str-for-bool"),
]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), BAD_CALLS)
def test_bad_arguments_fail_when_generate_is_called_before_any_rpc(args, kwargs, error, match):
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        with pytest.raises(error, match=match):
            client.generate(*args, **kwargs)  # raises at the call, not at the first next()
        with pytest.raises(error, match=match):
            client.complete(*args, **kwargs)

        async def run() -> None:
            async with AsyncLLMClient(target, timeout=10) as aclient:
                with pytest.raises(error, match=match):
                    aclient.generate(*args, **kwargs)
                with pytest.raises(error, match=match):
                    await aclient.complete(*args, **kwargs)

        asyncio.run(run())
    assert servicer.attempts == 0


@pytest.mark.parametrize(
    ("text", "truncate", "error", "match"),
    [
        (None, None, TypeError, "text"),
        ("\udfff", None, ValueError, "text"),
        ("x", 1.5, TypeError, "truncate_input_tokens"),
        ("x", 2**32, ValueError, "truncate_input_tokens"),
    ],
)
def test_bad_tokenize_arguments_fail_before_any_rpc(text, truncate, error, match):
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        with pytest.raises(error, match=match):
            client.tokenize(text, truncate_input_tokens=truncate)

        async def run() -> None:
            async with AsyncLLMClient(target, timeout=10) as aclient:
                with pytest.raises(error, match=match):
                    await aclient.tokenize(text, truncate_input_tokens=truncate)

        asyncio.run(run())
    assert servicer.deadlines == []  # no call of any method arrived
