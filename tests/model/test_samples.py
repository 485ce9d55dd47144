"""n samples of one prompt in one call (GenerateRequest.n), on the embedded model.

Each sample is reproducible on its own: the same tokens as a single request with the seed its last
message reports, alone or under concurrency; greedy samples are all alike; the samples hold n of
the server's places, leave together, and (continuous batching with its prefix cache) share one
prefill of the prompt.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from entity_llm_server import EngineRequest, LLMService, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingSettings, EngineOverloadedError, Finished, Sampling, TextDelta
from entity_llm_server.engine.sampling import sample_seed

from ..conftest import ServerThread
from ..engines import serving

pytestmark = pytest.mark.model

PROMPT = "You are a careful Python reviewer. Read the function, then say what it returns.\ndef f(x):"


def load(kind: str):
    return UnifiedLLMResource(engine=kind, batching=BatchingSettings(max_batch_size=8, max_queue=4)).load_engine()


@pytest.fixture(scope="module")
def engines():
    return {kind: load(kind) for kind in ("batching", "sequential", "padded")}


async def collect(engine, request: EngineRequest) -> tuple[dict[int, list[int]], dict[int, Finished], list[int]]:
    """Each sample's streamed ids (text deltas, then the tail), its Finished, and the order of indices seen."""
    ids: dict[int, list[int]] = {}
    finals: dict[int, Finished] = {}
    order: list[int] = []
    async for event in engine.generate(request):
        order.append(event.index)
        assert event.index not in finals  # nothing of a sample after its last message
        if isinstance(event, TextDelta):
            ids.setdefault(event.index, []).extend(event.token_ids)
        else:
            finals[event.index] = event
            ids.setdefault(event.index, []).extend(event.tail_ids)
    return ids, finals, order


@pytest.mark.parametrize("kind", ["batching", "sequential", "padded"])
def test_each_sample_is_its_single_request_twin_and_greedy_samples_are_alike(engines, kind):
    engine = engines[kind]
    sampled = Sampling(temperature=1.0, seed=1234, top_k=50)

    async def main():
        many = await collect(engine, EngineRequest(PROMPT, max_new_tokens=12, sampling=sampled, n=4))
        twins = [
            await collect(engine, EngineRequest(PROMPT, max_new_tokens=12, sampling=Sampling(**kw)))
            for kw in ({"temperature": 1.0, "seed": sample_seed(1234, i), "top_k": 50} for i in range(4))
        ]
        greedy = await collect(engine, EngineRequest(PROMPT, max_new_tokens=12, n=3))
        return many, twins, greedy

    (ids, finals, order), twins, (_, greedy_finals, _) = serving(engine, main)
    assert sorted(finals) == [0, 1, 2, 3]
    assert set(order) == {0, 1, 2, 3}
    assert [finals[i].seed for i in range(4)] == [sample_seed(1234, i) for i in range(4)]
    assert finals[0].seed == 1234
    for i, (_, twin_finals, _) in enumerate(twins):
        assert finals[i].token_ids == twin_finals[0].token_ids
        assert ids[i] == list(finals[i].token_ids)  # the stream carried exactly the sample's ids
    assert len({finals[i].token_ids for i in range(4)}) > 1  # samples differ
    assert len({f.token_ids for f in greedy_finals.values()}) == 1
    assert sorted(greedy_finals) == [0, 1, 2]
    assert all(f.seed is None for f in greedy_finals.values())


def test_samples_under_concurrency_are_what_they_are_alone(engines):
    engine = engines["batching"]
    request = EngineRequest(PROMPT, max_new_tokens=10, sampling=Sampling(temperature=0.8, seed=77), n=3)
    others = [
        EngineRequest(f"def g{i}(y):", max_new_tokens=10, sampling=Sampling(temperature=1.0, seed=i)) for i in range(4)
    ]

    async def main():
        alone = await collect(engine, request)
        crowd = await asyncio.gather(collect(engine, request), *(collect(engine, r) for r in others))
        return alone, crowd[0]

    (_, alone, _), (_, crowded, _) = serving(engine, main)
    assert {i: f.token_ids for i, f in crowded.items()} == {i: f.token_ids for i, f in alone.items()}


def test_the_prompt_is_prefilled_once_for_every_sample(engines):
    engine = engines["batching"]
    assert engine.shares_prefixes

    async def main():
        return await collect(engine, EngineRequest(PROMPT, max_new_tokens=4, n=4))

    _, finals, _ = serving(engine, main)
    full_blocks = (finals[0].input_tokens - 1) // 16 * 16
    assert full_blocks > 0
    assert [finals[i].cached_tokens for i in range(4)] == [0] + [full_blocks] * 3


def test_samples_take_n_places_and_leave_together(engines):
    engine = engines["batching"]  # capacity 8 + 4

    async def main():
        with pytest.raises(EngineOverloadedError):
            await anext(engine.generate(EngineRequest(PROMPT, max_new_tokens=4, n=13)))
        assert engine.in_flight == 0
        stream = engine.generate(EngineRequest(PROMPT, max_new_tokens=400, n=4))
        await anext(stream)
        assert engine.in_flight == 4
        held = engine.core_state().held
        await stream.aclose()  # the client left: every sample is cancelled in the core
        for _ in range(200):
            if engine.core_state().held == 0:
                break
            await asyncio.sleep(0.05)
        return held, engine.core_state().held, engine.in_flight

    held, after, in_flight = serving(engine, main)
    assert held >= 1
    assert (after, in_flight) == (0, 0)


def test_n_travels_the_wire_and_is_checked():
    server = ServerThread(LLMService(UnifiedLLMResource(default_max_new_tokens=6))).start()

    async def call(**fields) -> list[llm_pb2.GenerateResponse]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            request = llm_pb2.GenerateRequest(prompt=PROMPT, **fields)
            return [m async for m in stub.Generate(request, timeout=60)]

    try:
        messages = server.call(call(n=3, temperature=1.0, seed=5))
        refused = []
        for n in (0, 17):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                server.call(call(n=n))
            refused.append((caught.value.code(), caught.value.details()))
    finally:
        server.stop()
    finals = [m for m in messages if m.finish_reason]
    assert sorted(m.index for m in finals) == [0, 1, 2]
    assert [m.seed for m in sorted(finals, key=lambda m: m.index)] == [sample_seed(5, i) for i in range(3)]
    assert all(m.generated_token_count == 6 for m in finals)
    assert {m.index for m in messages} == {0, 1, 2}
    assert refused == [
        (grpc.StatusCode.INVALID_ARGUMENT, "invalid request: n: must be between 1 and 16, got 0"),
        (grpc.StatusCode.INVALID_ARGUMENT, "invalid request: n: must be between 1 and 16, got 17"),
    ]
