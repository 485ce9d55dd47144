"""Sampling, seeds, logprobs, min_new_tokens, repetition penalty and chat, on the embedded model.

The same `choose()` runs in both engines: these tests check what it promises
(a seed reproduces a text alone or among concurrent requests, on either
engine; logprobs are the model's own) against real model outputs.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import torch

from entity_llm_client import LLMClient
from entity_llm_server import EngineRequest, LLMService, TransformersEngine, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import (
    BatchingEngine,
    BatchingSettings,
    EngineError,
    Sampling,
)
from entity_llm_server.engine import rows as r
from entity_llm_server.engine import sampling as s

from ..engines import batching_engine, forced_forward, run, serving
from .scripted import ScriptedLM

pytestmark = pytest.mark.model

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def batching() -> BatchingEngine:
    engine = UnifiedLLMResource(batching=BatchingSettings(max_batch_size=8, max_queue=8)).load_engine()
    assert isinstance(engine, BatchingEngine)
    return engine


@pytest.fixture(scope="module")
def sequential():
    return UnifiedLLMResource(engine="sequential").load_engine()


def sampled(seed: int | None, **kw) -> EngineRequest:
    params = {"temperature": 1.0, "seed": seed, **kw}
    return EngineRequest(PROMPT, max_new_tokens=24, sampling=Sampling(**params))


def test_a_seed_gives_the_same_text_alone_among_others_and_on_both_engines(batching, sequential):
    async def on_batching():
        alone = [(await run(batching, sampled(seed)))[1].token_ids for seed in (1, 2)]
        crowd = [sampled(seed) for seed in (1, 2)] + [sampled(None) for _ in range(6)]
        together = await asyncio.gather(*(run(batching, r) for r in crowd))
        return alone, [final.token_ids for _, final, _ in together[:2]], [f.seed for _, f, _ in together]

    alone, together, seeds = serving(batching, on_batching)
    assert alone == together
    assert alone[0] != alone[1]  # different seeds, different samples
    assert seeds[:2] == [1, 2]
    assert len(set(seeds[2:])) == 6  # unseeded requests got seeds of their own, reported back

    async def on_sequential():
        return [(await run(sequential, sampled(seed)))[1].token_ids for seed in (1, 2)]

    assert serving(sequential, on_sequential) == alone


def test_a_reported_seed_reproduces_the_text(batching):
    async def main():
        _, first, _ = await run(batching, sampled(None))
        _, again, _ = await run(batching, sampled(first.seed))
        return first, again

    first, again = serving(batching, main)
    assert first.seed is not None
    assert again.token_ids == first.token_ids


def test_greedy_logprobs_are_the_models_log_softmax(batching):
    async def main():
        request = EngineRequest(PROMPT, max_new_tokens=6, sampling=Sampling(logprobs=True, top_logprobs=3))
        return await run(batching, request)

    _, final, deltas = serving(batching, main)
    entries = [e for d in deltas for e in d.logprobs] + list(final.tail_logprobs)
    assert [e.token_id for e in entries] == list(final.token_ids)
    assert final.seed is None  # greedy: no sampler seed
    # The reference: the model's own next-token distribution, step by step.
    model, tokenizer = batching.model, batching.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]  # with the start token, as the server encodes a prompt
    with torch.inference_mode():
        for entry in entries:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            reference = logits.log_softmax(-1)
            assert entry.token_id == int(reference.argmax())
            assert math.isclose(entry.logprob, float(reference[entry.token_id]), abs_tol=1e-3)
            best = reference.topk(3)
            assert [t for t, _ in entry.top] == best.indices.tolist()
            pairs = zip(entry.top, best.values.tolist(), strict=True)
            assert all(math.isclose(a, b, abs_tol=1e-3) for (_, a), b in pairs)
            assert entry.top_text == tuple(tokenizer.decode([t]) for t, _ in entry.top)
            ids.append(entry.token_id)


def test_sampling_follows_the_temperature(batching):
    """Low temperature concentrates on the greedy choice; high temperature spreads out."""

    async def main(temperature: float):
        requests = [
            EngineRequest(PROMPT, max_new_tokens=1, sampling=Sampling(temperature=temperature, seed=seed))
            for seed in range(16)  # the engine's capacity
        ]
        results = await asyncio.gather(*(run(batching, r) for r in requests))
        return [final.token_ids[0] for _, final, _ in results]

    greedy = serving(batching, lambda: run(batching, EngineRequest(PROMPT, max_new_tokens=1)))[1].token_ids[0]
    cold = serving(batching, lambda: main(0.05))
    hot = serving(batching, lambda: main(5.0))
    assert cold.count(greedy) >= 15
    assert len(set(hot)) >= 6


def test_top_k_one_and_tiny_top_p_are_greedy(batching):
    async def main():
        greedy = (await run(batching, EngineRequest(PROMPT, max_new_tokens=16)))[1].token_ids
        k1 = (await run(batching, sampled(5, top_k=1, temperature=3.0)))[1].token_ids[:16]
        p0 = (await run(batching, sampled(6, top_p=1e-6, temperature=3.0)))[1].token_ids[:16]
        return greedy, k1, p0

    greedy, k1, p0 = serving(batching, main)
    assert k1 == greedy
    assert p0 == greedy


def test_top_k_restricts_sampling_to_the_k_most_likely(batching):
    async def main():
        request = EngineRequest(
            PROMPT,
            max_new_tokens=12,
            sampling=Sampling(temperature=4.0, top_k=3, seed=11, logprobs=True, top_logprobs=3),
        )
        return await run(batching, request)

    _, final, deltas = serving(batching, main)
    entries = [e for d in deltas for e in d.logprobs] + list(final.tail_logprobs)
    assert len(entries) == 12
    for entry in entries:
        # The distribution sampled from holds three tokens, and the choice is one of them.
        assert entry.token_id in [t for t, _ in entry.top]
        assert math.isclose(sum(math.exp(lp) for _, lp in entry.top), 1.0, abs_tol=1e-4)


@pytest.mark.parametrize("kind", ["batching", "sequential"])
def test_min_new_tokens_holds_off_eos(kind):
    engine = UnifiedLLMResource(engine=kind, batching=BatchingSettings(max_batch_size=4, max_queue=4)).load_engine()
    eos = min(engine.eos_ids)
    forced_forward(engine, eos)  # the model now wants to end at every step

    async def main():
        plain = (await run(engine, EngineRequest(PROMPT, max_new_tokens=32)))[1]
        held = EngineRequest(PROMPT, max_new_tokens=32, sampling=Sampling(min_new_tokens=7, logprobs=True))
        return plain, await run(engine, held)

    plain, (_, held, deltas) = serving(engine, main)
    assert (plain.reason.value, plain.token_ids) == ("eos", (eos,))
    assert held.reason.value == "eos"
    assert held.generated_tokens == 8  # seven tokens, then the EOS it held off
    assert eos not in held.token_ids[:7]
    assert held.token_ids[7] == eos
    # The EOS was masked out of the distribution the first seven came from.
    entries = [e for d in deltas for e in d.logprobs] + list(held.tail_logprobs)
    assert entries[-1].token_id == eos
    assert entries[-1].logprob > -1e-3


def test_repetition_penalty_discourages_repeats(batching):
    async def main():
        plain = (await run(batching, EngineRequest("a a a a a a a a", max_new_tokens=32)))[1].token_ids
        request = EngineRequest("a a a a a a a a", max_new_tokens=32, sampling=Sampling(repetition_penalty=3.0))
        penalised = (await run(batching, request))[1].token_ids
        return plain, penalised

    plain, penalised = serving(batching, main)
    assert penalised != plain
    assert len(set(penalised)) > len(set(plain))


def test_step_keys_and_noise_depend_only_on_seed_step_and_token():
    keys = torch.tensor([s.step_key(7, 0), s.step_key(7, 1), s.step_key(7, 0)])
    noise = s.gumbel(keys, 4096)
    assert torch.equal(noise[0], noise[2])
    assert not torch.equal(noise[0], noise[1])
    # Gumbel(0, 1): mean ~0.5772, variance pi^2/6.
    sample = s.gumbel(torch.tensor([s.step_key(seed, 3) for seed in range(64)]), 4096).flatten()
    assert abs(float(sample.mean()) - 0.5772) < 0.02
    assert abs(float(sample.var()) - math.pi**2 / 6) < 0.05


def test_the_noise_is_finite_for_every_token_even_where_the_hash_is_at_its_top():
    """Found by a constrained request: at these (key, token) pairs the uniform number rounded to 1.0
    in float32, the noise was +inf, and that token won whatever its probability (about 1 draw in 16.7
    million); under a constraint that had masked it, the score became NaN."""
    for key, token in ((6298, 1272), (8346, 1728), (8979, 3467)):
        noise = s.gumbel(torch.tensor([key]), 4096)
        assert torch.isfinite(noise).all()
        assert noise[0, token] == noise.max()  # still the row's largest draw, now a finite one


def test_penalised_requests_in_a_step_the_manager_pads_are_served():
    """Found with constraints: the manager pads a step's rows (15 requests, 16 rows), and a
    per-request mask of 15 rows (repetition penalties) no longer fit the scores: the batching
    thread died, failing every stream."""
    engine = UnifiedLLMResource(batching=BatchingSettings(max_batch_size=32, max_queue=32)).load_engine()

    async def main():
        crowd = [
            EngineRequest(f"def f{i}(x):" * (1 + i % 5), max_new_tokens=8, sampling=Sampling(repetition_penalty=1.3))
            for i in range(15)
        ]
        return await asyncio.gather(*(run(engine, r) for r in crowd))

    finals = [final for _, final, _ in serving(engine, main)]
    assert [f.generated_tokens for f in finals] == [8] * 15


def test_chat_messages_render_with_the_template(serve):
    server = serve(LLMService()).start()
    engine = server.call(server.service.engine())
    messages = [("system", "You write Python."), ("user", "Print hello.")]
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True
    )

    async def both():
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            chat = llm_pb2.GenerateRequest(
                messages=[llm_pb2.ChatMessage(role=r, content=c) for r, c in messages], max_new_tokens=12
            )
            plain = llm_pb2.GenerateRequest(prompt=rendered, max_new_tokens=12)
            return [[m async for m in stub.Generate(r)] for r in (chat, plain)]

    chat, plain = server.call(both())

    def generated(stream: list[llm_pb2.GenerateResponse]) -> tuple[str, list[int]]:
        # Text and ids, not messages: a stream that falls behind gets several steps in one message.
        return "".join(m.token for m in stream), [t for m in stream for t in m.token_ids]

    assert generated(chat) == generated(plain)
    assert chat[-1].input_token_count == len(engine.encode(rendered))
    assert chat[-1].input_token_count > len(engine.encode("You write Python.Print hello."))


def test_wire_fields_reach_the_engine_and_come_back(serve):
    server = serve(LLMService()).start()

    async def call(**fields):
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            return [m async for m in stub.Generate(llm_pb2.GenerateRequest(prompt=PROMPT, **fields))]

    sampled_a = server.call(call(temperature=1.0, seed=42, max_new_tokens=10, top_logprobs=2))
    sampled_b = server.call(call(temperature=1.0, seed=42, max_new_tokens=10))
    assert "".join(m.token for m in sampled_a) == "".join(m.token for m in sampled_b)
    last = sampled_a[-1]
    assert last.HasField("seed")
    assert last.seed == 42
    ids = [i for m in sampled_a for i in m.token_ids]
    entries = [e for m in sampled_a for e in m.logprobs]
    assert [e.token_id for e in entries] == ids
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    greedy = server.call(call(max_new_tokens=4))
    assert not greedy[-1].HasField("seed")
    assert all(not m.logprobs for m in greedy)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens"),
        ({"top_logprobs": 11}, "top_logprobs"),
        ({"messages": [llm_pb2.ChatMessage(role="user", content="hi")]}, "messages"),  # with a prompt
        ({"prompt": "", "messages": [llm_pb2.ChatMessage(role="", content="hi")]}, "messages[0].role"),
    ],
)
def test_bad_sampling_fields_are_invalid_argument_naming_the_field(serve, fields, field):
    server = serve(LLMService()).start()

    async def call():
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            request = llm_pb2.GenerateRequest(**{"prompt": PROMPT, **fields})
            return [m async for m in stub.Generate(request)]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        server.call(call())
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field}:" in caught.value.details()


def test_graph_mode_gives_logprobs_and_penalties_equal_to_eager_mode(batching):
    # With graphs asked for on a CPU, transformers runs the steps uncaptured, but the
    # sampling processors run their graph-mode code: one static computation per step,
    # the penalised tokens in a static mask, logprobs copied out of static buffers.
    graphs = UnifiedLLMResource(
        batching=BatchingSettings(max_batch_size=8, max_queue=8, cuda_graphs=True)
    ).load_engine()
    assert isinstance(graphs, BatchingEngine)
    requests = [
        EngineRequest(PROMPT, max_new_tokens=12, sampling=Sampling(logprobs=True, top_logprobs=3)),
        EngineRequest(PROMPT, max_new_tokens=12, sampling=Sampling(repetition_penalty=1.5, logprobs=True)),
        EngineRequest(
            "import os\n",
            max_new_tokens=12,
            sampling=Sampling(
                temperature=0.9, top_k=20, seed=5, repetition_penalty=1.3, top_logprobs=s.MAX_TOP_LOGPROBS
            ),
        ),
        EngineRequest("class Parser:", max_new_tokens=12),  # a plain row among them
    ]

    def outcomes(engine):
        async def main():
            return await asyncio.gather(*(run(engine, r) for r in requests))

        results = serving(engine, main)
        return [(final.token_ids, [e for d in deltas for e in d.logprobs or ()] + list(final.tail_logprobs))
                for _, final, deltas in results]  # fmt: skip

    captured, eager = outcomes(graphs), outcomes(batching)
    assert not graphs.batching.sampling.eager
    assert batching.batching.sampling.eager
    for (ids, entries), (eager_ids, eager_entries) in zip(captured, eager, strict=True):
        assert ids == eager_ids
        assert len(entries) == len(eager_entries)
        for entry, reference in zip(entries, eager_entries, strict=True):
            assert entry.token_id == reference.token_id
            assert math.isclose(entry.logprob, reference.logprob, abs_tol=1e-4)
            assert [t for t, _ in entry.top] == [t for t, _ in reference.top]
            pairs = zip(entry.top, reference.top, strict=True)
            assert all(math.isclose(a, b, abs_tol=1e-4) for (_, a), (_, b) in pairs)
    assert [len(e.top) for e in captured[0][1]] == [3] * 12
    assert [len(e.top) for e in captured[2][1]] == [s.MAX_TOP_LOGPROBS] * 12
    # The penalty took effect in graph mode: greedy with and without it differ.
    assert captured[1][0] != captured[0][0]


def test_a_top_k_beyond_the_vocabulary_means_no_limit(batching):
    """Found by the fuzzer: a top_k over 2**31 once overflowed the manager's int32 arguments and killed its loop."""

    async def main():
        huge = (await run(batching, sampled(9, top_k=2**32 - 1)))[1].token_ids
        none = (await run(batching, sampled(9, top_k=0)))[1].token_ids
        return huge, none, batching.healthy

    huge, none, healthy = serving(batching, main)
    assert huge == none
    assert healthy


def test_each_sampling_parameter_through_the_sdk_and_a_real_server(serve):
    """The SDK's keywords reach the engine over the wire and change what comes back."""
    server = serve(LLMService()).start()
    with LLMClient(server.target, timeout=60) as client:
        greedy = client.complete(PROMPT, max_new_tokens=16)
        assert greedy.seed is None
        # top_k=1 and a vanishing top_p leave one token to sample: the greedy one.
        assert client.complete(PROMPT, max_new_tokens=16, temperature=2.0, top_k=1, seed=3).text == greedy.text
        assert client.complete(PROMPT, max_new_tokens=16, temperature=2.0, top_p=1e-6, seed=4).text == greedy.text
        hot = client.complete(PROMPT, max_new_tokens=16, temperature=2.0, seed=5)
        assert hot.seed == 5
        assert hot.text != greedy.text
        assert client.complete(PROMPT, max_new_tokens=16, temperature=2.0, seed=5).text == hot.text
        repeats = client.complete("a a a a a a a a", max_new_tokens=24)
        penalised = client.complete("a a a a a a a a", max_new_tokens=24, repetition_penalty=3.0)
        assert len(set(penalised.token_ids)) > len(set(repeats.token_ids))
        scored = client.complete(PROMPT, max_new_tokens=4, top_logprobs=3)
        assert [e.token_id for e in scored.logprobs] == list(scored.token_ids)
        assert all(len(e.top_logprobs) == 3 for e in scored.logprobs)
        chat = client.complete(messages=[("user", "Print hello.")], max_new_tokens=8)
        assert chat.usage.input_tokens > len(client.tokenize("Print hello.").ids)


def test_min_new_tokens_through_a_real_server(serve):
    """A scripted model that ends after three tokens keeps going until min_new_tokens."""
    tokenizer = UnifiedLLMResource().load_engine().tokenizer
    ids = tokenizer(" return n", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    model = ScriptedLM([*ids, eos], len(tokenizer), eos)
    server = serve(LLMService(engine=TransformersEngine(model, tokenizer, default_max_new_tokens=64))).start()
    with LLMClient(server.target, timeout=60) as client:
        plain = client.complete("def f(n):")
        held = client.complete("def f(n):", min_new_tokens=len(ids) + 4)
    assert plain.usage.generated_tokens == len(ids) + 1
    assert held.finish_reason.name == "EOS"
    assert held.usage.generated_tokens == len(ids) + 5  # four more tokens, then the EOS
    assert held.text.startswith(plain.text)


def test_a_fault_in_one_requests_sampling_fails_that_request_alone(monkeypatch):
    """The sampling hook runs on the batching thread: an exception there must not kill it."""
    engine = batching_engine(max_batch_size=4, max_queue=4)
    real = r.row_values

    def broken(sampling, step, vocab):
        if sampling.seed == 666:
            raise RuntimeError("injected sampler fault")
        return real(sampling, step, vocab)

    monkeypatch.setattr(r, "row_values", broken)

    async def main():
        async def outcome(request):
            try:
                return await run(engine, request)
            except EngineError as error:
                return error

        results = await asyncio.gather(
            outcome(sampled(666)), outcome(EngineRequest(PROMPT, max_new_tokens=12)), outcome(sampled(7))
        )
        return (*results, engine.healthy)

    bad, greedy, good, healthy = serving(engine, main)
    assert isinstance(bad, EngineError)
    assert "injected sampler fault" in str(bad)
    assert greedy[1].generated_tokens == 12
    assert good[1].generated_tokens == 24
    assert healthy  # the batching thread lived on


def test_each_requests_arguments_are_worked_out_once_and_follow_its_steps(monkeypatch):
    """The hook works a request's sampling parameters out when the request first has a row, and
    at every later step writes exactly what `rows.row_values` gives for that step (the seeded key,
    min_new_tokens' hold on EOS), in eager and in graph mode; a request whose parameters change
    (the same id, another request) is worked out again."""
    from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState

    from entity_llm_server.engine.cb_sampling import SamplingProcessors

    vocab, prompt = 97, [5, 6, 7]
    samplings = [
        Sampling(),
        Sampling(temperature=0.7, top_p=0.9, seed=11),
        Sampling(min_new_tokens=2),
        Sampling(temperature=1.2, top_k=5, min_new_tokens=3, seed=3, repetition_penalty=1.2),
        Sampling(logprobs=True, top_logprobs=2),
    ]
    calls: list[Sampling] = []
    real = r.row_values
    monkeypatch.setattr(r, "row_values", lambda x, step, v: calls.append(x) or real(x, step, v))

    def expected(sampling: Sampling, step: int) -> list[int]:
        values = real(sampling, step, vocab)
        bits = [int(torch.tensor([float(v)]).view(torch.int32)[0]) for v in values]  # floats as float32 bits
        return [bits[i] if i in (0, 2, 3, 4, 5) else int(v) for i, v in enumerate(values)]

    for eager in (True, False):
        hook = SamplingProcessors(vocab, frozenset({1}), "cpu", eager=eager, rows=8)
        calls.clear()
        states = [
            RequestState(f"r{i}", list(prompt), logit_processor_kwargs={"sampling": x, "prompt_len": len(prompt)})
            for i, x in enumerate(samplings)
        ]
        storage = torch.zeros((8, 8), dtype=torch.int32)
        for step in range(5):
            if step == 3:  # r1 is now another request, with other parameters
                states[1] = RequestState("r1", list(prompt), logit_processor_kwargs={"sampling": Sampling(seed=4)})
                states[1].generated_tokens = [9] * 3
            for state in states:
                state.position_offset = len(prompt) + step
            hook.prepare_tensor_args([FutureRequestState(x, True, {}, 1) for x in states], storage)
            for row, state in enumerate(states):
                want = expected(state.logit_processor_kwargs["sampling"], step)
                assert storage[:, row].tolist() == want, (eager, step, row)
            for state in states:
                state.generated_tokens.append(9)
        assert calls == [*samplings, states[1].logit_processor_kwargs["sampling"]]


def test_graph_modes_seen_mask_follows_each_request_as_rows_change_hands():
    """Graph mode keeps each penalised row's seen tokens from step to step and adds only the new
    ones; a row whose request changed (one ended, the others moved up) is cleared and refilled."""
    from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState

    from entity_llm_server.engine.cb_sampling import SamplingProcessors

    vocab = 50
    hook = SamplingProcessors(vocab, frozenset({1}), "cpu", eager=False, rows=4)
    penalised = {"sampling": Sampling(repetition_penalty=1.3), "prompt_len": 2}
    a, b, c = (RequestState(rid, [3, 4 + i], logit_processor_kwargs=dict(penalised)) for i, rid in enumerate("abc"))
    plain = RequestState("p", [7, 8], logit_processor_kwargs={"prompt_len": 2})
    storage = torch.zeros((8, 4), dtype=torch.int32)
    steps = [[a, b, plain], [a, b, plain], [b, c, plain], [plain, c, b], [c, b]]
    for step, states in enumerate(steps):
        for i, state in enumerate(states):
            state.generated_tokens.append(10 + 3 * step + i)
            state.position_offset = 2 + len(state.generated_tokens)
        hook.prepare_tensor_args([FutureRequestState(x, True, {}, 1) for x in states], storage)
        for row, state in enumerate(states):
            if state is not plain:
                want = r.seen_mask([state.initial_tokens + state.generated_tokens], vocab, "cpu")[0]
                assert torch.equal(hook._seen_rows[row], want), (step, row)
