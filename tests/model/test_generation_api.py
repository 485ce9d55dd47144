"""Generation parameters and finish reasons through a real server, on every engine.

The `..._on_every_engine` tests run the demo model on each of ENGINE_KINDS
(continuous batching in process, in its engine process, and sequential) and
compare with what transformers itself computes; the rest check the front
end's own validation, which runs before any engine does.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from entity_llm_client import AsyncLLMClient, FinishReason, InvalidArgumentError, LLMClient, Usage
from entity_llm_server import LLMService, TransformersEngine, UnifiedLLMResource, default_model_path
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

from ..conftest import ServerThread
from ..engines import ENGINE_KINDS, load_engine
from .scripted import ScriptedLM

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tokenizer():
    return UnifiedLLMResource().load_engine().tokenizer


def scripted_server(serve, tokenizer, text: str):
    """A server on the sequential engine whose greedy output is exactly `text`, then EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos_id = tokenizer.eos_token_id
    model = ScriptedLM([*ids, eos_id], len(tokenizer), eos_id)
    return serve(LLMService(engine=TransformersEngine(model, tokenizer, default_max_new_tokens=1000))).start()


# -- every engine, the real model ---------------------------------------------------------------

DEFAULT_LENGTH = 24
# The demo model's greedy continuation of EOS_PROMPT: 40 tokens of text, then its EOS.
EOS_PROMPT = "def main():"
EOS_TEXT = (
    '\n    """Return a newer that the main thread.\n\n    This is a newer that the main thread is not called\n'
    '    to be called.\n\n    """\n    return _convert_other(other)'
)
CONTEXT = 512  # the demo model's


@pytest.fixture(scope="module", params=ENGINE_KINDS)
def engine_server(request):
    """(server, engine): a real server on each engine in turn, the demo model behind it."""
    engine = load_engine(request.param, max_batch_size=4, max_queue=8, max_new_tokens=DEFAULT_LENGTH)
    server = ServerThread(LLMService(engine=engine)).start()
    server.call(server.service.engine(), timeout=120)
    yield server, engine
    server.call(engine.close(), timeout=120)
    server.stop()


@pytest.fixture(scope="module")
def reference_model():
    """The demo model as transformers loads it, for reference outputs."""
    return UnifiedLLMResource().load_model()


def greedy_reference(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1] :].tolist()


def test_max_new_tokens_ends_with_max_tokens_on_every_engine(engine_server, reference_model, tokenizer):
    server, _ = engine_server
    with LLMClient(server.target, timeout=60) as client:
        done = client.complete("import os\n", max_new_tokens=7)
        default = client.complete("import os\n")
    assert (done.finish_reason, done.usage.generated_tokens) == (FinishReason.MAX_TOKENS, 7)
    expected = greedy_reference(reference_model, tokenizer, "import os\n", DEFAULT_LENGTH)
    assert list(done.token_ids) == expected[:7]
    # Left unset, max_new_tokens is the server's default.
    assert (default.finish_reason, list(default.token_ids)) == (FinishReason.MAX_TOKENS, expected)


def test_eos_ends_with_eos_and_counts_it_on_every_engine(engine_server, tokenizer):
    server, _ = engine_server
    with LLMClient(server.target, timeout=60) as client:
        done = client.complete(EOS_PROMPT, max_new_tokens=100)
    assert (done.text, done.finish_reason) == (EOS_TEXT, FinishReason.EOS)
    prompt_ids = tokenizer(EOS_PROMPT)["input_ids"]  # the start token and the text's
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert done.usage == Usage(input_tokens=len(prompt_ids), generated_tokens=41)
    assert done.token_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("stops", "include", "text", "stop"),
    [
        (["newer that"], False, EOS_TEXT[: EOS_TEXT.index("newer that")], "newer that"),
        (["newer that"], True, EOS_TEXT[: EOS_TEXT.index("newer that") + 10], "newer that"),
        (["main thread", "Return a"], False, EOS_TEXT[: EOS_TEXT.index("Return a")], "Return a"),  # earliest wins
        (["main threads"], False, EOS_TEXT, ""),  # a beginning that never completes is released
    ],
)
def test_stop_sequences_match_across_token_boundaries_on_every_engine(
    engine_server, tokenizer, stops, include, text, stop
):
    # Each stop is several tokens of the text: it can only be matched across their boundaries.
    assert all(len(tokenizer(s, add_special_tokens=False)["input_ids"]) > 1 for s in stops)
    server, _ = engine_server
    with LLMClient(server.target, timeout=60) as client:
        chunks = list(
            client.generate(EOS_PROMPT, max_new_tokens=100, stop_sequences=stops, include_stop_sequence=include)
        )
    assert "".join(c.text for c in chunks) == text
    final = chunks[-1]
    assert final.stop_sequence == stop
    assert final.finish_reason is (FinishReason.STOP_SEQUENCE if stop else FinishReason.EOS)
    if stop and not include:  # nothing past the stop, not even part of it, ever left the server
        assert all(stop not in c.text for c in chunks)


def test_time_limit_ends_the_stream_normally_on_every_engine(engine_server):
    server, _ = engine_server
    long = CONTEXT - 12  # no EOS before: only the time limit can end it early
    with LLMClient(server.target, timeout=60) as client:
        done = client.complete("a", time_limit_ms=200, max_new_tokens=long, min_new_tokens=long)
    assert done.finish_reason is FinishReason.TIME_LIMIT
    assert done.usage.generated_tokens == len(done.token_ids) < long


def test_truncation_and_context_limits_on_every_engine(engine_server):
    server, _ = engine_server
    long_prompt = "x = 1\n" * 300  # 900 tokens: more than the context holds
    with LLMClient(server.target, timeout=60) as client:
        with pytest.raises(InvalidArgumentError) as too_long:
            client.complete(long_prompt)
        assert [v.field for v in too_long.value.field_violations] == ["prompt"]
        assert "truncate_input_tokens" in too_long.value.details
        kept = client.complete(long_prompt, truncate_input_tokens=16, max_new_tokens=5)
        assert kept.usage == Usage(input_tokens=16, generated_tokens=5)
        # 500 prompt tokens leave room for 12 in the 512-token context: clipped, TOKEN_LIMIT.
        clipped = client.complete(long_prompt, truncate_input_tokens=500, max_new_tokens=20, min_new_tokens=12)
        assert (clipped.finish_reason, clipped.usage.generated_tokens) == (FinishReason.TOKEN_LIMIT, 12)
        with pytest.raises(InvalidArgumentError) as too_many:
            client.complete("a", max_new_tokens=CONTEXT)
        assert [v.field for v in too_many.value.field_violations] == ["max_new_tokens"]
        assert f"({CONTEXT - 1})" in too_many.value.details
        info = client.model_info()
        assert (info.context_length, info.default_max_new_tokens, info.max_max_new_tokens) == (
            CONTEXT,
            DEFAULT_LENGTH,
            CONTEXT - 1,
        )


def test_a_seed_reproduces_the_text_alone_and_among_others_on_every_engine(engine_server):
    server, _ = engine_server
    sampled = {"max_new_tokens": 16, "temperature": 1.0, "top_k": 50}

    async def run():
        async with AsyncLLMClient(server.target, timeout=60) as client:
            alone = await client.complete("def f(x):", seed=7, **sampled)
            crowd = await asyncio.gather(
                client.complete("def f(x):", seed=7, **sampled),
                client.complete("def f(x):", seed=8, **sampled),
                *(client.complete("import os\n", **sampled) for _ in range(2)),
            )
            return alone, crowd

    alone, (again, other, *unseeded) = asyncio.run(run())
    assert alone.seed == again.seed == 7
    assert again.token_ids == alone.token_ids
    assert other.seed == 8
    assert other.token_ids != alone.token_ids
    assert all(c.seed is not None for c in unseeded)  # the server chose and reported them
    assert unseeded[0].seed != unseeded[1].seed


def test_logprobs_are_the_models_own_on_every_engine(engine_server, reference_model, tokenizer):
    server, _ = engine_server
    with LLMClient(server.target, timeout=60) as client:
        done = client.complete("def fibonacci(n):", max_new_tokens=8, logprobs=True, top_logprobs=3)
    assert [e.token_id for e in done.logprobs] == list(done.token_ids)
    ids = tokenizer("def fibonacci(n):")["input_ids"] + list(done.token_ids)
    with torch.inference_mode():  # the model's next-token distribution at every generated position
        logits = reference_model(input_ids=torch.tensor([ids])).logits[0].float()
    reference = logits.log_softmax(-1)[len(ids) - len(done.token_ids) - 1 : -1]
    for entry, row in zip(done.logprobs, reference, strict=True):
        assert entry.token_id == int(row.argmax())  # greedy
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-3)
        best = row.topk(3)
        assert [t.token_id for t in entry.top_logprobs] == best.indices.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-3)
        assert [t.text for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in best.indices.tolist()]


def test_tokenize_and_model_info_describe_the_served_model_on_every_engine(engine_server, tokenizer):
    server, engine = engine_server

    async def run():
        async with AsyncLLMClient(server.target, timeout=60) as client:
            return (
                await client.tokenize("def fibonacci(n):"),
                await client.tokenize("def fibonacci(n):", truncate_input_tokens=2),
                await client.model_info(),
            )

    tokens, last_two, info = asyncio.run(run())
    # What the model is given for a prompt: `tokenizer(text)`, its start token included.
    expected = tokenizer("def fibonacci(n):")["input_ids"]
    assert expected[0] == tokenizer.bos_token_id
    assert list(tokens.ids) == expected
    assert tokens.count == len(expected)
    assert tokens.pieces[0] == tokenizer.bos_token
    assert tokenizer.convert_tokens_to_string(list(tokens.pieces[1:])) == "def fibonacci(n):"
    # Truncation keeps the start token and the last of the text.
    assert last_two.ids == (tokens.ids[0], tokens.ids[-1])
    assert info.model_id == str(default_model_path())
    assert info.vocab_size == engine.vocab_size == len(tokenizer)
    assert info.eos_token_ids == (tokenizer.eos_token_id,)
    with LLMClient(server.target, timeout=60) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            client.tokenize("x", truncate_input_tokens=0)
        assert [v.field for v in caught.value.field_violations] == ["truncate_input_tokens"]


# -- the front end's checks (any engine: the sequential one on a scripted model) ---------------------


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


def test_a_huge_tokenize_neither_stalls_the_server_nor_overflows_its_reply(serve):
    server = serve(LLMService(UnifiedLLMResource())).start()
    text = "def double(x):\n    return x * 2\n" * 100_000  # 3.3 MB: over a million tokens, seconds of work

    engine = server.call(server.service.engine(), timeout=120)
    tokenizing = threading.Event()
    tokenize = engine.tokenize

    def watched(*args):
        tokenizing.set()
        return tokenize(*args)

    engine.tokenize = watched

    async def run():
        async with AsyncLLMClient(server.target, timeout=120) as client:
            big = asyncio.ensure_future(client.tokenize(text))
            assert await asyncio.to_thread(tokenizing.wait, 60)  # the server is tokenizing now
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
