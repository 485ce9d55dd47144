"""Generation parameters and finish reasons through a real server (issue: the full API)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from entity_llm_client import AsyncLLMClient, FinishReason, InvalidArgumentError, LLMClient, Usage
from entity_llm_server import LLMService, TransformersEngine, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

from .scripted import ScriptedLM

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tokenizer():
    return UnifiedLLMResource().load_engine().tokenizer


def scripted_server(serve, tokenizer, text: str, *, eos: bool = True, context: int = 512, step_seconds: float = 0.0):
    """A server whose greedy output is exactly `text` (then EOS, or `text` repeated)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos_id = tokenizer.eos_token_id
    script = [*ids, eos_id] if eos else ids * 200
    model = ScriptedLM(script, len(tokenizer), eos_id, context=context, step_seconds=step_seconds)
    return serve(LLMService(engine=TransformersEngine(model, tokenizer, default_max_new_tokens=1000))).start()


def test_max_new_tokens_ends_with_max_tokens(serve, tokenizer):
    server = scripted_server(serve, tokenizer, " x = 1\n", eos=False)
    with LLMClient(server.target, timeout=30) as client:
        done = client.complete("a", max_new_tokens=7)
    assert done.finish_reason is FinishReason.MAX_TOKENS
    assert done.usage.generated_tokens == 7
    assert len(done.token_ids) == 7


def test_eos_ends_with_eos_and_counts_it(serve, tokenizer):
    server = scripted_server(serve, tokenizer, " return n")
    with LLMClient(server.target, timeout=30) as client:
        done = client.complete("def f(n):")
    assert (done.text, done.finish_reason) == (" return n", FinishReason.EOS)
    prompt_ids = tokenizer("def f(n):")["input_ids"]  # the start token and the text's
    assert prompt_ids[0] == tokenizer.bos_token_id
    text_ids = tokenizer(" return n", add_special_tokens=False)["input_ids"]
    assert done.usage == Usage(input_tokens=len(prompt_ids), generated_tokens=len(text_ids) + 1)


@pytest.mark.parametrize(
    ("stops", "include", "text", "stop"),
    [
        (["STOP"], False, "alpha beta ", "STOP"),
        (["STOP"], True, "alpha beta STOP", "STOP"),
        (["gamma", "beta S"], False, "alpha ", "beta S"),  # the earliest match wins
        (["STAR"], False, "alpha beta STOP gamma", ""),  # a prefix that never completes is released
    ],
)
def test_stop_sequences_match_across_token_boundaries(serve, tokenizer, stops, include, text, stop):
    server = scripted_server(serve, tokenizer, "alpha beta STOP gamma")
    with LLMClient(server.target, timeout=30) as client:
        chunks = list(client.generate("x", stop_sequences=stops, include_stop_sequence=include))
    assert "".join(c.text for c in chunks) == text
    final = chunks[-1]
    assert final.stop_sequence == stop
    assert final.finish_reason is (FinishReason.STOP_SEQUENCE if stop else FinishReason.EOS)
    if not include:  # nothing past the stop, not even part of it, ever left the server
        assert all(stop not in c.text for c in chunks if stop)


def test_time_limit_ends_the_stream_normally(serve, tokenizer):
    server = scripted_server(serve, tokenizer, " tick", eos=False, step_seconds=0.02)
    with LLMClient(server.target, timeout=30) as client:
        done = client.complete("a", time_limit_ms=300, max_new_tokens=500)
    assert done.finish_reason is FinishReason.TIME_LIMIT
    assert 0 < done.usage.generated_tokens < 500


def test_truncation_and_context_limits(serve, tokenizer):
    server = scripted_server(serve, tokenizer, " y", eos=False, context=64)
    long_prompt = "x = 1\n" * 100
    with LLMClient(server.target, timeout=30) as client:
        with pytest.raises(InvalidArgumentError) as too_long:
            client.complete(long_prompt)
        assert "prompt" in too_long.value.details
        kept = client.complete(long_prompt, truncate_input_tokens=16, max_new_tokens=5)
        assert kept.usage.input_tokens == 16
        # 60 prompt tokens leave room for 4 in a 64-token context: clipped, TOKEN_LIMIT.
        clipped = client.complete(long_prompt, truncate_input_tokens=60, max_new_tokens=20)
        assert (clipped.finish_reason, clipped.usage.generated_tokens) == (FinishReason.TOKEN_LIMIT, 4)
        with pytest.raises(InvalidArgumentError) as too_many:
            client.complete("a", max_new_tokens=64)
        assert "max_new_tokens" in too_many.value.details
        # The engine's default (1000) does not fit: what a request gets is reported.
        info = client.model_info()
        assert (info.default_max_new_tokens, info.max_max_new_tokens) == (63, 63)
        # A prompt past BIG_INPUT_CHARS is encoded off the event loop: same answers.
        huge = "x = 1\n" * 5000
        with pytest.raises(InvalidArgumentError) as too_long:
            client.complete(huge)
        assert "prompt" in too_long.value.details
        assert client.complete(huge, truncate_input_tokens=16, max_new_tokens=5).usage.input_tokens == 16


def test_invalid_requests_get_bad_request_details_naming_every_field(serve, tokenizer):
    server = scripted_server(serve, tokenizer, " y")
    request = llm_pb2.GenerateRequest(
        prompt="x", max_new_tokens=0, stop_sequences=["a"] * 6 + ["", "b" * 241], time_limit_ms=0
    )
    with grpc.insecure_channel(server.target) as channel:
        call = llm_pb2_grpc.LLMServiceStub(channel).Generate(request, timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    fields = {v.field for v in bad.field_violations}
    assert fields == {"max_new_tokens", "time_limit_ms", "stop_sequences", "stop_sequences[6]", "stop_sequences[7]"}
    for field in fields:
        assert field in error.details()


def test_tokenize_and_model_info_describe_the_served_model(serve):
    resource = UnifiedLLMResource(default_max_new_tokens=24)
    server = serve(LLMService(resource)).start()

    async def run():
        async with AsyncLLMClient(server.target, timeout=60) as client:
            return (
                await client.tokenize("def fibonacci(n):"),
                await client.tokenize("def fibonacci(n):", truncate_input_tokens=2),
                await client.model_info(),
            )

    tokens, last_two, info = asyncio.run(run())
    engine = server.call(server.service.engine())
    # What the model is given for a prompt: `tokenizer(text)`, its start token included.
    expected = engine.tokenizer("def fibonacci(n):")["input_ids"]
    assert expected[0] == engine.tokenizer.bos_token_id
    assert list(tokens.ids) == expected
    assert tokens.count == len(expected)
    assert tokens.pieces[0] == engine.tokenizer.bos_token
    assert engine.tokenizer.convert_tokens_to_string(list(tokens.pieces[1:])) == "def fibonacci(n):"
    # Truncation keeps the start token and the last of the text.
    assert last_two.ids == (tokens.ids[0], tokens.ids[-1])
    assert info.model_id == resource.model_id
    assert info.default_max_new_tokens == 24
    assert info.vocab_size == engine.vocab_size
    assert info.context_length == engine.max_sequence_tokens
    assert info.max_max_new_tokens == info.context_length - 1
    assert set(info.eos_token_ids) == set(engine.eos_ids)
    with LLMClient(server.target, timeout=60) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            client.tokenize("x", truncate_input_tokens=0)
        assert "truncate_input_tokens" in caught.value.details


def test_stop_sequences_on_the_batching_engine_with_real_text(serve):
    server = serve(LLMService(UnifiedLLMResource(default_max_new_tokens=40))).start()
    with LLMClient(server.target, timeout=60) as client:
        free = client.complete("def fibonacci(n):")
        assert len(free.text) > 12, free.text
        stop = free.text[6:10]  # a stop inside the text, wherever tokens split it
        cut = client.complete("def fibonacci(n):", stop_sequences=[stop])
    assert cut.text == free.text[: free.text.index(stop)]
    assert (cut.finish_reason, cut.stop_sequence) == (FinishReason.STOP_SEQUENCE, stop)


def test_a_huge_tokenize_neither_stalls_the_server_nor_overflows_its_reply(serve):
    server = serve(LLMService(UnifiedLLMResource())).start()
    text = "def double(x):\n    return x * 2\n" * 100_000  # 3.3 MB: over a million tokens, seconds of work

    async def run():
        async with AsyncLLMClient(server.target, timeout=120) as client:
            await client.model_info()  # the model is loaded
            big = asyncio.ensure_future(client.tokenize(text))
            await asyncio.sleep(0.3)  # the server is tokenizing now
            await client.model_info()
            # Served while the big one is still being tokenized: the event loop was free.
            answered_meanwhile = not big.done()
            with pytest.raises(InvalidArgumentError) as caught:
                await big
            return answered_meanwhile, caught.value

    answered_meanwhile, error = asyncio.run(run())
    assert answered_meanwhile
    # Its reply would be over the message limit: said in words, naming the field.
    assert [v.field for v in error.field_violations] == ["text"]
    assert "MiB message limit" in error.details
    assert "truncate_input_tokens" in error.details
