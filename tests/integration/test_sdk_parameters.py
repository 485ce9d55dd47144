"""What the SDK puts on the wire for each parameter, and what it makes of logprobs, seeds and stop tokens.

A capturing servicer decodes the requests with the server's google-protobuf
messages, so presence is checked as a server sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from entity_llm_client import AsyncLLMClient, Completion, FinishReason, LLMClient, TokenLogprob, TopLogprob, Usage
from entity_llm_server._gen.entity.grpc import llm_pb2

from .capturing import CapturingServicer, Context, running

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
    "min_p",
    "typical_p",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "prompt_logprobs",
)

EXPECTED_LOGPROBS = (
    TokenLogprob(1, -0.5, (TopLogprob(1, -0.5, "H"), TopLogprob(7, -1.5, "J")), rank=1),
    TokenLogprob(2, -0.25, rank=2),
    TokenLogprob(3, -2.0, rank=4096),
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
            min_p=0.125,
            typical_p=0.75,
            presence_penalty=-0.5,
            frequency_penalty=1.25,
            logit_bias={0: -100, 7: 2.5, 2**32 - 1: 100.0},
            stop_token_ids=(11, 2**32 - 1),
            ignore_eos=True,
            n=1,
            seed=2**64 - 1,
            logprobs=True,
            top_logprobs=2,
            prompt_logprobs=10,
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
    assert (request.min_p, request.typical_p) == (0.125, 0.75)
    assert (request.presence_penalty, request.frequency_penalty) == (-0.5, 1.25)
    assert dict(request.logit_bias) == {0: -100.0, 7: 2.5, 2**32 - 1: 100.0}
    assert list(request.stop_token_ids) == [11, 2**32 - 1]
    assert request.ignore_eos
    assert list(request.prompt_token_ids) == []
    assert (request.n, request.prompt_logprobs) == (1, 10)


def test_unset_parameters_stay_unset_and_zero_is_sent_when_given():
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        client.complete("x")
        client.complete("x", temperature=0.0, seed=0, top_k=0, min_p=0.0, frequency_penalty=0, n=0, prompt_logprobs=0)
        client.complete("x", max_new_tokens=0, prompt_logprobs=1)  # 0 goes out: the server checks what it needs
        nones = ("logprobs", "top_logprobs", "stop_sequences", "request_id", "include_stop_sequence")
        nones += ("stop_token_ids", "ignore_eos", "logit_bias")
        client.complete("x", **dict.fromkeys((*OPTIONAL_FIELDS, *nones)))
    bare, zeros, scoring, all_none = servicer.requests
    assert bare == all_none
    assert not [name for name in OPTIONAL_FIELDS if bare.HasField(name)]
    assert (bare.logprobs, bare.top_logprobs, list(bare.stop_sequences), bare.request_id) == (False, 0, [], "")
    assert (list(bare.stop_token_ids), bare.ignore_eos, dict(bare.logit_bias)) == ([], False, {})
    assert [name for name in OPTIONAL_FIELDS if zeros.HasField(name)] == [
        "temperature",
        "top_k",
        "seed",
        "min_p",
        "frequency_penalty",
        "n",
        "prompt_logprobs",
    ]
    assert (zeros.temperature, zeros.top_k, zeros.seed, zeros.min_p, zeros.frequency_penalty) == (0.0, 0, 0, 0.0, 0.0)
    assert (zeros.n, zeros.prompt_logprobs) == (0, 0)
    assert [name for name in OPTIONAL_FIELDS if scoring.HasField(name)] == ["max_new_tokens", "prompt_logprobs"]
    assert (scoring.max_new_tokens, scoring.prompt_logprobs) == (0, 1)


def test_messages_replace_the_prompt():
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        client.complete(messages=[("system", "Be brief."), ("user", "Hi")], temperature=0.5)
    (request,) = servicer.requests
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert request.prompt == ""
    assert request.temperature == 0.5


def test_prompt_token_ids_replace_the_prompt():
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        client.complete(prompt_token_ids=[0, 319, 2**32 - 1], truncate_input_tokens=2)
        client.complete(prompt_token_ids=iter((5,)))  # any iterable of ids
    ids, one = servicer.requests
    assert list(ids.prompt_token_ids) == [0, 319, 2**32 - 1]
    assert (ids.prompt, list(ids.messages), ids.truncate_input_tokens) == ("", [], 2)
    assert list(one.prompt_token_ids) == [5]


class StopTokenServicer(CapturingServicer):
    """Ends every stream on a stop token: `stop_token`, the last message's last id."""

    def __init__(self, stop_token: int) -> None:
        super().__init__()
        self.stop_token = stop_token

    async def reply(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        yield llm_pb2.GenerateResponse(token="def", token_ids=[319], request_id="r-2")
        yield llm_pb2.GenerateResponse(
            token=" f",
            token_ids=[290, self.stop_token],
            finish_reason=llm_pb2.FINISH_REASON_STOP_TOKEN,
            stop_token_id=self.stop_token,
            input_token_count=2,
            generated_token_count=3,
            request_id="r-2",
        )


def test_a_stop_token_ends_the_stream_and_the_completion_with_its_id():
    # 0 too: an id that is falsy must still come back (the demo model's EOS is 0).
    with running(StopTokenServicer(0)) as target, LLMClient(target, timeout=10) as client:
        chunks = list(client.generate("def", stop_token_ids=[0]))
        done = client.complete("def", stop_token_ids=[0])
    assert [(c.finish_reason, c.stop_token_id) for c in chunks] == [(None, None), (FinishReason.STOP_TOKEN, 0)]
    assert done == Completion(
        text="def f",
        token_ids=(319, 290, 0),
        finish_reason=FinishReason.STOP_TOKEN,
        usage=Usage(2, 3),
        request_id="r-2",
        stop_token_id=0,
    )
    assert FinishReason.STOP_TOKEN.value == "stop_token"


def test_streams_that_end_otherwise_have_no_stop_token():
    with running(CapturingServicer()) as target, LLMClient(target, timeout=10) as client:
        chunks = list(client.generate("x"))
        done = client.complete("x")
    assert [c.stop_token_id for c in chunks] == [None, None]
    assert (done.finish_reason, done.stop_token_id) == (FinishReason.MAX_TOKENS, None)


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


def test_the_async_client_sends_token_ids_and_reads_the_stop_token():
    servicer = StopTokenServicer(304)

    async def run() -> tuple[Completion, list[int | None]]:
        async with AsyncLLMClient(target, timeout=10) as client:
            done = await client.complete(
                prompt_token_ids=(319, 290),
                stop_token_ids=[304],
                ignore_eos=True,
                min_p=0.25,
                typical_p=0.5,
                presence_penalty=1.5,
                frequency_penalty=-2.0,
                logit_bias={0: -100.0},
            )
            stops = [chunk.stop_token_id async for chunk in client.generate("def", stop_token_ids=(304, 11))]
            return done, stops

    with running(servicer) as target:
        done, stops = asyncio.run(run())
    ids, plain = servicer.requests
    assert (list(ids.prompt_token_ids), ids.prompt, list(ids.stop_token_ids)) == ([319, 290], "", [304])
    assert (ids.ignore_eos, ids.min_p, ids.typical_p) == (True, 0.25, 0.5)
    assert (ids.presence_penalty, ids.frequency_penalty, dict(ids.logit_bias)) == (1.5, -2.0, {0: -100.0})
    assert (plain.prompt, list(plain.stop_token_ids), list(plain.prompt_token_ids)) == ("def", [304, 11], [])
    assert not plain.ignore_eos
    assert not [name for name in OPTIONAL_FIELDS if plain.HasField(name)]
    assert (done.finish_reason, done.stop_token_id, done.token_ids) == (FinishReason.STOP_TOKEN, 304, (319, 290, 304))
    assert stops == [None, 304]


class SamplesServicer(CapturingServicer):
    """Streams the request's n samples (1 if unset) interleaved, as the server does.

    Sample i is "abc..."[i] followed by its step, one piece per step, sample
    i's token ids 10 * (i + 1) + step: sample 0 has three pieces and ends
    with MAX_TOKENS, sample 1 two and STOP_TOKEN (its last id), sample 2 two
    and EOS. Each step sends the samples from the highest index down, so the
    stream starts with the highest sample and ends with sample 0. The first
    message and each sample's last carry the request id; each last message
    carries the seed (seed + 1000 * i, when one was sent) and the prompt
    tokens served from the prefix cache (2 for sample 0, 4 for the others).
    """

    async def reply(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        n = request.n if request.HasField("n") else 1
        lengths = [3 if i == 0 else 2 for i in range(n)]
        reasons = [llm_pb2.FINISH_REASON_MAX_TOKENS, llm_pb2.FINISH_REASON_STOP_TOKEN, llm_pb2.FINISH_REASON_EOS]
        first = True
        for step in range(max(lengths)):
            for i in reversed(range(n)):
                if step >= lengths[i]:
                    continue
                token_id = 10 * (i + 1) + step
                message = llm_pb2.GenerateResponse(
                    token=f"{chr(ord('a') + i)}{step}",
                    token_ids=[token_id],
                    index=i,
                    request_id="r-9" if first else "",
                    logprobs=[llm_pb2.TokenLogprobs(token_id=token_id, logprob=-(i + 1) / 4)]
                    if request.logprobs
                    else [],
                )
                first = False
                if step == lengths[i] - 1:
                    reason = reasons[i % 3]
                    message.finish_reason = reason
                    message.input_token_count = 5
                    message.generated_token_count = lengths[i]
                    message.cached_token_count = 2 if i == 0 else 4
                    message.request_id = "r-9"
                    if reason == llm_pb2.FINISH_REASON_STOP_TOKEN:
                        message.stop_token_id = token_id
                    if request.HasField("seed"):
                        message.seed = request.seed + 1000 * i
                yield message


THREE_SAMPLES = [
    Completion(
        text="a0a1a2",
        token_ids=(10, 11, 12),
        finish_reason=FinishReason.MAX_TOKENS,
        usage=Usage(5, 3, 2),
        request_id="r-9",
        logprobs=(TokenLogprob(10, -0.25), TokenLogprob(11, -0.25), TokenLogprob(12, -0.25)),
        seed=7,
    ),
    Completion(
        text="b0b1",
        token_ids=(20, 21),
        finish_reason=FinishReason.STOP_TOKEN,
        usage=Usage(5, 2, 4),
        request_id="r-9",
        logprobs=(TokenLogprob(20, -0.5), TokenLogprob(21, -0.5)),
        seed=1007,
        stop_token_id=21,
    ),
    Completion(
        text="c0c1",
        token_ids=(30, 31),
        finish_reason=FinishReason.EOS,
        usage=Usage(5, 2, 4),
        request_id="r-9",
        logprobs=(TokenLogprob(30, -0.75), TokenLogprob(31, -0.75)),
        seed=2007,
    ),
]


def test_n_samples_stream_interleaved_each_chunk_with_its_index():
    servicer = SamplesServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        chunks = list(client.generate("x", n=3, temperature=0.75, seed=7))
    (request,) = servicer.requests
    assert (request.n, request.seed, request.temperature) == (3, 7, 0.75)
    assert [(c.index, c.text, c.token_ids) for c in chunks] == [
        (2, "c0", (30,)),
        (1, "b0", (20,)),
        (0, "a0", (10,)),
        (2, "c1", (31,)),
        (1, "b1", (21,)),
        (0, "a1", (11,)),
        (0, "a2", (12,)),
    ]
    assert {c.request_id for c in chunks} == {"r-9"}  # the id came on the first message, from sample 2
    finals = [(c.index, c.finish_reason, c.usage, c.seed, c.stop_token_id) for c in chunks if c.finish_reason]
    assert finals == [
        (2, FinishReason.EOS, Usage(5, 2, 4), 2007, None),
        (1, FinishReason.STOP_TOKEN, Usage(5, 2, 4), 1007, 21),
        (0, FinishReason.MAX_TOKENS, Usage(5, 3, 2), 7, None),
    ]


def test_samples_returns_each_samples_completion_in_index_order():
    servicer = SamplesServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        done = client.samples("x", n=3, temperature=0.75, seed=7, logprobs=True)
        (one,) = client.samples(prompt_token_ids=[4, 5], n=1)
    three, single = servicer.requests
    assert (three.prompt, three.n, three.seed, three.temperature, three.logprobs) == ("x", 3, 7, 0.75, True)
    assert (list(single.prompt_token_ids), single.n, single.HasField("seed")) == ([4, 5], 1, False)
    assert done == THREE_SAMPLES
    assert one == Completion("a0a1a2", (10, 11, 12), FinishReason.MAX_TOKENS, Usage(5, 3, 2), request_id="r-9")


def test_complete_reads_the_cached_prompt_tokens():
    with running(SamplesServicer()) as target, LLMClient(target, timeout=10) as client:
        done = client.complete("x")
        last = list(client.generate("x"))[-1]
    assert done.usage == Usage(input_tokens=5, generated_tokens=3, cached_tokens=2)
    assert (last.index, last.usage) == (0, Usage(5, 3, 2))
    assert Usage(5, 3) == Usage(5, 3, 0)  # positional use from before cached_tokens still works


def test_complete_refuses_several_samples_before_any_call():
    servicer = SamplesServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        with pytest.raises(TypeError, match=r"n=2.*samples\(n=\.\.\.\)"):
            client.complete("x", n=2)

        async def run() -> None:
            async with AsyncLLMClient(target, timeout=10) as aclient:
                with pytest.raises(TypeError, match=r"samples\(n=\.\.\.\)"):
                    await aclient.complete(messages=[("user", "Hi")], n=16)

        asyncio.run(run())
    assert servicer.attempts == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        pytest.param(("x",), {"n": None}, TypeError, r"samples\(\) takes n", id="n-none"),
        pytest.param(("x",), {"n": 2.0}, TypeError, "n must be an int", id="float-n"),
        pytest.param(("x",), {"n": -1}, ValueError, "n must be between", id="negative-n"),
        pytest.param((), {"n": 2}, TypeError, "exactly one", id="no-prompt"),
        pytest.param(("x",), {"n": 2, "top_k": -1}, ValueError, "top_k", id="bad-option"),
    ],
)
def test_bad_samples_arguments_fail_before_any_call(args, kwargs, error, match):
    servicer = SamplesServicer()
    with running(servicer) as target, LLMClient(target, timeout=10) as client:
        with pytest.raises(error, match=match):
            client.samples(*args, **kwargs)

        async def run() -> None:
            async with AsyncLLMClient(target, timeout=10) as aclient:
                with pytest.raises(error, match=match):
                    await aclient.samples(*args, **kwargs)

        asyncio.run(run())
    assert servicer.attempts == 0


def test_the_calls_span_reports_every_sample(monkeypatch):
    ended: list[dict[str, object]] = []

    class Recorded:
        """Stands in for the call's span: keeps what the stream ends it with."""

        metadata = ()

        def __init__(self, method: str, target: str) -> None:
            pass

        def end(self, error: BaseException | None = None, **attributes: object) -> None:
            ended.append(attributes)

    monkeypatch.setattr("entity_llm_client._calls.Traced", Recorded)
    with running(SamplesServicer()) as target, LLMClient(target, timeout=10) as client:
        client.samples("x", n=3)
        client.complete("x")
    several, one = ended
    assert several == {
        "entity_llm.request_id": "r-9",
        "gen_ai.response.finish_reasons": ["max_tokens", "stop_token", "eos"],  # in sample order
        "gen_ai.usage.input_tokens": 5,  # the one prompt's
        "gen_ai.usage.output_tokens": 7,  # every sample's
    }
    assert one == {
        "entity_llm.request_id": "r-9",
        "gen_ai.response.finish_reasons": ["max_tokens"],
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 3,
    }


class BrokenSamplesServicer(SamplesServicer):
    """Breaks the protocol: streams 4 samples whatever n asks, and no last message for sample 1."""

    async def reply(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        four = llm_pb2.GenerateRequest()
        four.CopyFrom(request)
        four.n = 4
        async for message in super().reply(four, context):
            if message.index != 1 or not message.finish_reason:
                yield message


def test_samples_names_the_sample_a_broken_stream_got_wrong():
    with running(BrokenSamplesServicer()) as target, LLMClient(target, timeout=10) as client:
        with pytest.raises(RuntimeError, match="the stream sent sample 3, beyond the 3 asked for"):
            client.samples("x", n=3)
        with pytest.raises(RuntimeError, match="sample 1 ended without a final message"):
            client.samples("x", n=4)


def test_the_async_client_streams_and_gathers_samples():
    servicer = SamplesServicer()

    async def run() -> tuple[list[Completion], list[tuple[int, str]]]:
        async with AsyncLLMClient(target, timeout=10) as client:
            done = await client.samples(messages=[("user", "Hi")], n=3, seed=7, logprobs=True)
            pieces = [(chunk.index, chunk.text) async for chunk in client.generate("x", n=2)]
            return done, pieces

    with running(servicer) as target:
        done, pieces = asyncio.run(run())
    chat, plain = servicer.requests
    assert ([(m.role, m.content) for m in chat.messages], chat.n, chat.seed) == ([("user", "Hi")], 3, 7)
    assert (plain.n, plain.HasField("seed")) == (2, False)
    assert done == THREE_SAMPLES
    assert pieces == [(1, "b0"), (0, "a0"), (1, "b1"), (0, "a1"), (0, "a2")]


BAD_CALLS = [
    pytest.param((), {}, TypeError, "exactly one", id="neither"),
    pytest.param(("x",), {"messages": [("user", "Hi")]}, TypeError, "exactly one", id="both"),
    pytest.param(("x",), {"prompt_token_ids": [1]}, TypeError, "exactly one", id="prompt-and-ids"),
    pytest.param((), {"messages": [("user", "Hi")], "prompt_token_ids": [1]}, TypeError, "exactly one", id="chat-ids"),
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
    pytest.param((), {"prompt_token_ids": []}, ValueError, "at least one", id="no-token-ids"),
    pytest.param((), {"prompt_token_ids": [1, -1]}, ValueError, r"prompt_token_ids\[1\]", id="negative-id"),
    pytest.param((), {"prompt_token_ids": [2**32]}, ValueError, r"prompt_token_ids\[0\]", id="id-beyond-uint32"),
    pytest.param((), {"prompt_token_ids": ["1"]}, TypeError, r"prompt_token_ids\[0\]", id="str-id"),
    pytest.param((), {"prompt_token_ids": [1.0]}, TypeError, r"prompt_token_ids\[0\]", id="float-id"),
    pytest.param((), {"prompt_token_ids": "1,2"}, TypeError, "prompt_token_ids takes a sequence", id="ids-as-str"),
    pytest.param((), {"prompt_token_ids": b"\x01"}, TypeError, "prompt_token_ids takes a sequence", id="ids-as-bytes"),
    pytest.param(("x",), {"stop_token_ids": 2}, TypeError, "stop_token_ids takes a sequence", id="stop-id-as-int"),
    pytest.param(("x",), {"stop_token_ids": [-1]}, ValueError, r"stop_token_ids\[0\]", id="negative-stop-id"),
    pytest.param(("x",), {"stop_token_ids": [True]}, TypeError, r"stop_token_ids\[0\]", id="bool-stop-id"),
    pytest.param(("x",), {"ignore_eos": 1}, TypeError, "ignore_eos", id="int-for-bool"),
    pytest.param(("x",), {"min_p": "0.1"}, TypeError, "min_p", id="str-for-min-p"),
    pytest.param(("x",), {"typical_p": 1e39}, ValueError, "typical_p", id="typical-p-overflow"),
    pytest.param(("x",), {"presence_penalty": True}, TypeError, "presence_penalty", id="bool-for-penalty"),
    pytest.param(("x",), {"frequency_penalty": 10**400}, ValueError, "frequency_penalty", id="huge-penalty"),
    pytest.param(("x",), {"logit_bias": [(1, 2.0)]}, TypeError, "logit_bias", id="bias-as-pairs"),
    pytest.param(("x",), {"logit_bias": {-1: 1.0}}, ValueError, "logit_bias", id="negative-bias-id"),
    pytest.param(("x",), {"logit_bias": {"5": 1.0}}, TypeError, "logit_bias", id="str-bias-id"),
    pytest.param(("x",), {"logit_bias": {5: "1"}}, TypeError, r"logit_bias\[5\]", id="str-bias"),
    pytest.param(("x",), {"logit_bias": {5: 1e39}}, ValueError, r"logit_bias\[5\]", id="bias-overflow"),
    pytest.param(("x",), {"n": -1}, ValueError, "n must be between 0 and", id="negative-n"),
    pytest.param(("x",), {"n": 2**32}, ValueError, "n must be between 0 and", id="n-beyond-uint32"),
    pytest.param(("x",), {"n": 1.0}, TypeError, "n must be an int", id="float-n"),
    pytest.param(("x",), {"n": True}, TypeError, "n must be an int", id="bool-n"),
    pytest.param(("x",), {"prompt_logprobs": -1}, ValueError, "prompt_logprobs must be between", id="negative-pl"),
    pytest.param(("x",), {"prompt_logprobs": 2**32}, ValueError, "prompt_logprobs must be between", id="huge-pl"),
    pytest.param(("x",), {"prompt_logprobs": True}, TypeError, "prompt_logprobs must be an int", id="bool-pl"),
    pytest.param(("x",), {"prompt_logprobs": "3"}, TypeError, "prompt_logprobs must be an int", id="str-pl"),
    pytest.param(("x",), {"max_new_tokens": -1}, ValueError, "max_new_tokens must be between", id="negative-max"),
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
