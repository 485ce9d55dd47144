"""Prompt logprobs and scoring (GenerateRequest.prompt_logprobs), and the rank of generated tokens.

The promise: the same numbers as a plain transformers forward pass over the prompt, on every core,
in chunks, for the demo model and a random-weight one; max_new_tokens 0 only scores.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import grpc
import pytest
import torch

from entity_llm_server import EngineRequest, LLMService, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingSettings, Finished, InvalidRequestError, Sampling, Scored, TextDelta
from entity_llm_server.engine.scoring import CHUNK, Scoring
from entity_llm_server.resource import default_model_path

from ..conftest import ServerThread
from ..engines import serving

pytestmark = pytest.mark.model

SOURCE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


def load(kind: str, folder=None):
    settings = BatchingSettings(max_batch_size=4, max_queue=4)
    return UnifiedLLMResource(folder, engine=kind, batching=settings).load_engine()


async def events(engine, request: EngineRequest) -> list:
    return [event async for event in engine.generate(request)]


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward pass over `ids`: [len(ids), vocab]."""
    with torch.inference_mode():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().log_softmax(-1)


def check_against_forward(entries, model, ids: list[int], top_n: int) -> None:
    reference = forward_logprobs(model, ids)
    assert [e.token_id for e in entries] == ids[1:]
    for position, entry in enumerate(entries):
        row = reference[position]
        assert abs(entry.logprob - float(row[entry.token_id])) < 1e-4, position
        assert entry.rank == int((row > row[entry.token_id]).sum()) + 1
        assert [t for t, _ in entry.top] == row.topk(top_n).indices.tolist()
        assert all(abs(lp - float(row[t])) < 1e-4 for t, lp in entry.top)
        if entry.token_id == int(row.argmax()):
            assert entry.rank == 1


def test_a_forward_pass_beside_continuous_batching_waits_its_turn():
    # The scoring thread's forward passes run beside the core's steps. On the CPU, a plain forward
    # pass that overlaps continuous batching's SDPA step computes wrong attention (transformers 5.24,
    # torch 2.13): nearly every one, here, without `scoring.one_forward_at_a_time`.
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    Scoring(model)  # as every core makes it: the model's forward passes take turns from now on
    ids = list(range(100, 140))
    expected = forward_logprobs(model, ids)
    generation = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=-1, pad_token_id=0)
    steps = ContinuousBatchingConfig(page_size=16, num_blocks=64, max_batch_tokens=32, max_requests_per_batch=4)
    started, done = threading.Event(), threading.Event()

    def batching() -> None:
        while not done.is_set():
            started.set()
            model.generate_batch(
                inputs=[list(range(200, 290))] * 3,
                generation_config=generation,
                continuous_batching_config=steps,
                progress_bar=False,
            )

    thread = threading.Thread(target=batching)
    thread.start()
    try:
        assert started.wait(60)
        wrong = sum(not torch.allclose(forward_logprobs(model, ids), expected, atol=1e-4) for _ in range(30))
    finally:
        done.set()
        thread.join(120)
    assert wrong == 0


@pytest.mark.parametrize("kind", ["batching", "sequential", "padded"])
def test_prompt_logprobs_are_a_plain_forward_pass_on_every_core(kind):
    engine = load(kind)
    prompt = SOURCE * 8  # longer than one chunk of positions
    ids = list(engine.tokenize(prompt).ids)
    assert len(ids) > CHUNK

    async def main():
        scored = await events(engine, EngineRequest(prompt, max_new_tokens=0, sampling=Sampling(prompt_logprobs=3)))
        truncated = await events(
            engine,
            EngineRequest(prompt, max_new_tokens=0, truncate_input_tokens=40, sampling=Sampling(prompt_logprobs=0)),
        )
        return scored, truncated

    scored, truncated = serving(engine, main)
    (head, final) = scored
    assert isinstance(head, Scored)
    assert isinstance(final, Finished)
    assert (final.generated_tokens, final.reason.value, final.input_tokens) == (0, "max_tokens", len(ids))
    check_against_forward(head.prompt_logprobs, engine.model, ids, 3)
    assert all(text for e in head.prompt_logprobs[:20] for text in e.top_text)  # alternatives come with their text
    (short, end) = truncated
    kept = list(engine.tokenize(prompt, 40).ids)
    assert end.input_tokens == 40
    check_against_forward(short.prompt_logprobs, engine.model, kept, 0)


def test_a_random_weight_model_scores_as_its_forward_pass(tiny_model):
    engine = load("batching", tiny_model("llama"))
    prompt = SOURCE * 2
    ids = list(engine.tokenize(prompt).ids)

    async def main():
        return await events(engine, EngineRequest(prompt, max_new_tokens=0, sampling=Sampling(prompt_logprobs=5)))

    head, _ = serving(engine, main)
    check_against_forward(head.prompt_logprobs, engine.model, ids, 5)


def test_scoring_then_generating_gives_the_same_tokens_and_generated_tokens_have_ranks():
    engine = load("batching")

    async def main():
        plain = await events(engine, EngineRequest(SOURCE, max_new_tokens=8, sampling=Sampling(logprobs=True)))
        both = await events(
            engine, EngineRequest(SOURCE, max_new_tokens=8, sampling=Sampling(prompt_logprobs=1, logprobs=True))
        )
        sampled = await events(
            engine,
            EngineRequest(SOURCE, max_new_tokens=16, sampling=Sampling(temperature=1.5, seed=3, top_logprobs=10)),
        )
        return plain, both, sampled

    plain, both, sampled = serving(engine, main)
    assert isinstance(both[0], Scored)
    assert not any(isinstance(e, Scored) for e in plain + sampled)
    assert both[-1].token_ids == plain[-1].token_ids
    greedy = [e for d in plain if isinstance(d, TextDelta) for e in d.logprobs] + list(plain[-1].tail_logprobs)
    assert [e.rank for e in greedy] == [1] * len(greedy)  # greedy: always the likeliest
    drawn = [e for d in sampled if isinstance(d, TextDelta) for e in d.logprobs] + list(sampled[-1].tail_logprobs)
    for entry in drawn:  # the rank agrees with the alternatives' logprobs
        better = sum(1 for _, lp in entry.top if lp > entry.logprob)
        assert entry.rank == better + 1 or (better == 10 and entry.rank > 10)
    assert any(e.rank > 1 for e in drawn)


def test_the_scoring_bound_and_zero_tokens_without_scoring_are_refused():
    engine = load("sequential")
    engine.inputs.max_prompt_logprobs_tokens = 10
    with pytest.raises(InvalidRequestError) as caught:
        engine.prepare(EngineRequest(SOURCE, max_new_tokens=0, sampling=Sampling(prompt_logprobs=0)))
    assert caught.value.field == "prompt_logprobs"
    assert "more than this server scores (10: --max-prompt-logprobs-tokens)" in str(caught.value)
    assert engine.prepare(
        EngineRequest(SOURCE, max_new_tokens=0, truncate_input_tokens=10, sampling=Sampling(prompt_logprobs=0))
    )
    with pytest.raises(InvalidRequestError) as zero:
        engine.prepare(EngineRequest(SOURCE, max_new_tokens=0))
    assert zero.value.field == "max_new_tokens"


def test_prompt_logprobs_through_the_wire():
    server = ServerThread(LLMService(UnifiedLLMResource(default_max_new_tokens=4))).start()

    async def call(**fields) -> list[llm_pb2.GenerateResponse]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            return [m async for m in stub.Generate(llm_pb2.GenerateRequest(prompt=SOURCE, **fields), timeout=60)]

    try:
        scored = server.call(call(max_new_tokens=0, prompt_logprobs=2))
        generated = server.call(call(prompt_logprobs=0, logprobs=True, n=2, temperature=1.0, seed=1))
        refused = []
        for fields in ({"max_new_tokens": 0}, {"prompt_logprobs": 11}):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                server.call(call(**fields))
            refused.append((caught.value.code(), caught.value.details()))
    finally:
        server.stop()
    first, last = scored
    assert first.request_id
    assert len(first.prompt_logprobs) == last.input_token_count - 1
    assert all(len(e.top_logprobs) == 2 and e.rank >= 1 for e in first.prompt_logprobs)
    assert all(t.text for e in first.prompt_logprobs for t in e.top_logprobs)
    assert (last.finish_reason, last.generated_token_count) == (llm_pb2.FINISH_REASON_MAX_TOKENS, 0)
    # With n samples, sample 0 carries the prompt's logprobs, once, before its text.
    with_prompt = [m for m in generated if m.prompt_logprobs]
    assert [m.index for m in with_prompt] == [0]
    assert next(m for m in generated if m.index == 0) is with_prompt[0]
    assert all(e.rank >= 1 for m in generated for e in m.logprobs)
    assert refused == [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid request: max_new_tokens: must be at least 1 when set (0 only with prompt_logprobs, to score "
            "the prompt)",
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, "invalid request: prompt_logprobs: at most 10 alternatives, got 11"),
    ]


def test_a_core_busy_scoring_is_alive_while_its_batching_loop_waits():
    """Found by the benchmark: 32 prompts queued for scoring held the batching core for longer than its
    liveness timeout while the batching loop, with nothing to run, took no step: the engine process
    was declared stuck and refused every call."""
    engine = load("batching")
    engine.batching.pulse.timeout = 0.3
    model, forward = engine.model, engine.model.forward

    def slow(*args, **kwargs):
        time.sleep(0.1)
        return forward(*args, **kwargs)

    async def main():
        model.forward = slow  # scoring only: the batching loop has nothing to run
        healthy = []
        prompts = [EngineRequest(SOURCE, max_new_tokens=0, sampling=Sampling(prompt_logprobs=0)) for _ in range(8)]
        scoring = asyncio.gather(*(events(engine, r) for r in prompts))
        while not scoring.done():
            healthy.append(engine.healthy)
            await asyncio.sleep(0.05)
        model.forward = forward
        return healthy, await scoring

    healthy, results = serving(engine, main)
    assert len(healthy) > 10  # the scoring took well past the timeout
    assert all(healthy)
    assert all(isinstance(r[0], Scored) for r in results)


@pytest.mark.parametrize("kind", ["sequential", "padded"])
def test_with_samples_the_prompts_logprobs_come_before_any_samples_text_and_one_token_prompts_get_theirs(kind):
    """Found in review: samples 1..n-1 started at once on cores without a prefix cache, and could stream
    text before sample 0's prompt logprobs; a one-token prompt's (empty) logprobs were never sent."""
    engine = load(kind)
    request = EngineRequest(
        SOURCE, max_new_tokens=4, n=3, sampling=Sampling(temperature=1.0, seed=2, prompt_logprobs=1)
    )
    bos = engine.tokenize("").ids

    async def main():
        many = await events(engine, request)
        single = await events(
            engine, EngineRequest("", prompt_token_ids=bos, max_new_tokens=0, sampling=Sampling(prompt_logprobs=0))
        )
        return many, single

    many, single = serving(engine, main)
    assert isinstance(many[0], Scored)
    assert [e.index for e in many if isinstance(e, Scored)] == [0]
    assert sorted(e.index for e in many if isinstance(e, Finished)) == [0, 1, 2]
    assert len(bos) == 1
    assert isinstance(single[0], Scored)
    assert single[0].prompt_logprobs == ()
    assert isinstance(single[1], Finished)


def test_n_samples_of_nothing_are_refused():
    engine = load("sequential")
    with pytest.raises(InvalidRequestError) as caught:
        engine.prepare(EngineRequest(SOURCE, max_new_tokens=0, n=2, sampling=Sampling(prompt_logprobs=0)))
    assert caught.value.field == "n"


def test_a_client_that_leaves_while_its_prompt_is_scored_is_never_generated_for():
    engine = load("batching")
    model, forward = engine.model, engine.model.forward
    scoring = threading.Event()

    def slow(*args, **kwargs):
        scoring.set()
        time.sleep(0.3)
        return forward(*args, **kwargs)

    async def main():
        steps = engine.core_state().steps
        model.forward = slow
        request = EngineRequest(SOURCE, max_new_tokens=64, sampling=Sampling(prompt_logprobs=0))
        stream = engine.generate(request)
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(scoring.wait, 30)
        waiting.cancel()  # the client leaves while its prompt is being scored
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await stream.aclose()
        await asyncio.sleep(1.0)  # the scoring ends; the request must go no further
        model.forward = forward
        return steps, engine.core_state(), engine.in_flight

    before, after, in_flight = serving(engine, main)
    assert after.held == 0
    assert after.steps == before  # the batching loop never ran a step for it
    assert in_flight == 0
