"""Prompt logprobs and `score()` in the SDK: what goes on the wire, and what chunks and completions carry.

`prompt_logprobs` on the wire (0 too), the chunk of no text that carries the
prompt's scores, `Completion.prompt_logprobs` (sample 0's, of `samples()`),
ranks, and `score()`, sync and async. A scoring servicer sends the scores as the server does: in a message of its
own, with no text and no finish reason, before any text.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from entity_llm_client import (
    AsyncLLMClient,
    Chunk,
    Completion,
    FinishReason,
    LLMClient,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from entity_llm_server._gen.entity.grpc import llm_pb2

from .capturing import Context, ScoringServicer, running, scored
from .test_sdk_parameters import EXPECTED_LOGPROBS, THREE_SAMPLES, SamplesServicer


def prompt_scores(alternatives: int) -> tuple[TokenLogprob, ...]:
    """What the SDK must make of the scoring servicer's prompt logprobs with `alternatives` asked for."""
    b, a, x = TopLogprob(12, -0.25, "b"), TopLogprob(11, -1.5, "a"), TopLogprob(40, -2.0, "x")
    c, y = TopLogprob(13, -3.0, "c"), TopLogprob(41, -3.5, "y")
    z, e, w = TopLogprob(42, -0.125, " z"), TopLogprob(43, -0.5, "\u00e9"), TopLogprob(44, -1.0, "w")
    return (
        TokenLogprob(11, -1.5, (b, a, x)[:alternatives], rank=2),
        TokenLogprob(12, -0.25, (b, c, y)[:alternatives], rank=1),
        TokenLogprob(13, -3.0, (z, e, w)[:alternatives], rank=7),
    )


def test_prompt_logprobs_come_on_a_first_chunk_of_no_text(capsys):
    servicer = ScoringServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        chunks = list(client.generate("The capital", prompt_logprobs=2, logprobs=True))
        for chunk in client.generate("The capital", prompt_logprobs=2):
            print(chunk, end="")
    assert capsys.readouterr().out == "Hello"  # the scores' chunk prints nothing
    request = servicer.requests[0]
    assert (request.prompt_logprobs, request.HasField("max_new_tokens"), request.logprobs) == (2, False, True)
    first, *text = chunks
    assert first == Chunk(text="", request_id="r-1", prompt_logprobs=prompt_scores(2))
    assert [(c.text, c.token_ids, c.prompt_logprobs) for c in text] == [("He", (1, 2), ()), ("llo", (3,), ())]
    assert [c.logprobs for c in text] == [EXPECTED_LOGPROBS[:2], EXPECTED_LOGPROBS[2:]]  # ranks of generated tokens
    assert [c.finish_reason for c in chunks] == [None, None, FinishReason.MAX_TOKENS]


def test_the_completion_keeps_the_prompt_logprobs_beside_the_generated_ones():
    servicer = ScoringServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        done = client.complete("The capital", prompt_logprobs=3, top_logprobs=2)
        plain = client.complete("The capital", logprobs=True)
    scoring, unscored = servicer.requests
    assert (scoring.prompt_logprobs, scoring.top_logprobs) == (3, 2)
    assert not unscored.HasField("prompt_logprobs")
    assert done == Completion(
        text="Hello",
        token_ids=(1, 2, 3),
        finish_reason=FinishReason.MAX_TOKENS,
        usage=Usage(4, 3),
        request_id="r-1",
        logprobs=EXPECTED_LOGPROBS,
        seed=2**64 - 1,
        prompt_logprobs=prompt_scores(3),
    )
    assert (plain.prompt_logprobs, plain.logprobs) == ((), EXPECTED_LOGPROBS)


def test_max_new_tokens_zero_only_scores():
    servicer = ScoringServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        chunks = list(client.generate(prompt_token_ids=[5, 11, 12, 13], max_new_tokens=0, prompt_logprobs=0))
    (request,) = servicer.requests
    assert (request.HasField("max_new_tokens"), request.max_new_tokens) == (True, 0)
    assert (request.HasField("prompt_logprobs"), request.prompt_logprobs) == (True, 0)
    assert list(request.prompt_token_ids) == [5, 11, 12, 13]
    assert [(c.text, c.prompt_logprobs, c.finish_reason, c.usage) for c in chunks] == [
        ("", prompt_scores(0), None, None),
        ("", (), FinishReason.MAX_TOKENS, Usage(4, 0)),
    ]


class ScoringSamplesServicer(SamplesServicer):
    """SamplesServicer's n samples, preceded by sample 0's prompt scores when a request asks for them."""

    async def reply(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        if request.HasField("prompt_logprobs"):
            yield scored(request, request_id="r-9", index=0)
        async for message in super().reply(request, context):
            yield message


def test_samples_put_the_prompt_logprobs_on_sample_0_only():
    servicer = ScoringSamplesServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        done = client.samples("x", n=3, seed=7, logprobs=True, prompt_logprobs=1)
        chunks = list(client.generate("x", n=2, prompt_logprobs=0))
    assert [(r.n, r.prompt_logprobs) for r in servicer.requests] == [(3, 1), (2, 0)]
    assert done == [dataclasses.replace(THREE_SAMPLES[0], prompt_logprobs=prompt_scores(1)), *THREE_SAMPLES[1:]]
    assert [(c.index, c.text, len(c.prompt_logprobs)) for c in chunks[:3]] == [(0, "", 3), (1, "b0", 0), (0, "a0", 0)]


def test_score_only_scores_and_returns_the_prompts_entries():
    servicer = ScoringServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        entries = client.score("The capital of France is Paris", top_logprobs=2, timeout=600)
        bare = client.score(prompt_token_ids=[5, 11, 12, 13], truncate_input_tokens=3)
        chat = client.score(messages=[("user", "Hi")], metadata=[("x-job", "7")])
    text, ids, turns = servicer.requests
    assert (text.prompt, text.max_new_tokens, text.prompt_logprobs) == ("The capital of France is Paris", 0, 2)
    assert not text.HasField("truncate_input_tokens")
    assert (list(ids.prompt_token_ids), ids.truncate_input_tokens, ids.prompt_logprobs) == ([5, 11, 12, 13], 3, 0)
    assert (ids.max_new_tokens, turns.max_new_tokens, turns.prompt_logprobs) == (0, 0, 0)
    assert [(m.role, m.content) for m in turns.messages] == [("user", "Hi")]
    assert [{field.name for field, _ in request.ListFields()} for request in servicer.requests] == [
        {"prompt", "max_new_tokens", "prompt_logprobs"},
        {"prompt_token_ids", "max_new_tokens", "prompt_logprobs", "truncate_input_tokens"},
        {"messages", "max_new_tokens", "prompt_logprobs"},
    ]
    assert entries == prompt_scores(2)
    assert bare == chat == prompt_scores(0)
    assert sum(entry.logprob for entry in entries) == -4.75  # the prompt's log-likelihood given its first token
    # gRPC sends deadlines rounded up: loose bounds.
    (_, own), (_, default), _ = servicer.deadlines
    assert own is not None
    assert own > 100  # the call's own timeout
    assert default is not None
    assert default < 20  # the client's


def test_the_async_client_scores_and_reads_prompt_logprobs():
    servicer = ScoringServicer()

    async def run() -> tuple[tuple[TokenLogprob, ...], Completion, list[Chunk]]:
        async with AsyncLLMClient(target, timeout=10) as client:
            entries = await client.score(messages=[("user", "Hi")], top_logprobs=3, truncate_input_tokens=8)
            done = await client.complete("x", prompt_logprobs=1)
            chunks = [chunk async for chunk in client.generate("x", max_new_tokens=0, prompt_logprobs=2)]
            return entries, done, chunks

    with running(servicer) as target:
        entries, done, chunks = asyncio.run(run())
    scoring, complete, stream = servicer.requests
    assert [(m.role, m.content) for m in scoring.messages] == [("user", "Hi")]
    assert (scoring.max_new_tokens, scoring.prompt_logprobs, scoring.truncate_input_tokens) == (0, 3, 8)
    assert (complete.HasField("max_new_tokens"), complete.prompt_logprobs) == (False, 1)
    assert (stream.max_new_tokens, stream.prompt_logprobs) == (0, 2)
    assert entries == prompt_scores(3)
    assert (done.text, done.prompt_logprobs, done.logprobs) == ("Hello", prompt_scores(1), EXPECTED_LOGPROBS)
    assert [(c.text, c.prompt_logprobs, c.finish_reason) for c in chunks] == [
        ("", prompt_scores(2), None),
        ("", (), FinishReason.MAX_TOKENS),
    ]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        pytest.param((), {}, TypeError, "exactly one", id="no-prompt"),
        pytest.param(("x",), {"prompt_token_ids": [1]}, TypeError, "exactly one", id="prompt-and-ids"),
        pytest.param(("x",), {"top_logprobs": -1}, ValueError, "top_logprobs must be between", id="negative"),
        pytest.param(("x",), {"top_logprobs": True}, TypeError, "top_logprobs must be an int", id="bool"),
        pytest.param(("x",), {"top_logprobs": None}, TypeError, "top_logprobs must be an int", id="none"),
        pytest.param(("x",), {"truncate_input_tokens": 1.5}, TypeError, "truncate_input_tokens", id="float-truncate"),
        pytest.param(("x",), {"max_new_tokens": 4}, TypeError, "max_new_tokens", id="generate-option"),
        pytest.param(("\ud800",), {}, ValueError, "prompt", id="lone-surrogate"),
    ],
)
def test_bad_score_arguments_fail_before_any_call(args, kwargs, error, match):
    servicer = ScoringServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        with pytest.raises(error, match=match):
            client.score(*args, **kwargs)

        async def run() -> None:
            async with AsyncLLMClient(target, timeout=10) as aclient:
                with pytest.raises(error, match=match):
                    await aclient.score(*args, **kwargs)

        asyncio.run(run())
    assert servicer.attempts == 0
