"""Continuous batching on the embedded model: correctness, cancellation, admission, failure."""

from __future__ import annotations

import asyncio
import threading

import pytest

from entity_llm_client import LLMClient
from entity_llm_server import EngineRequest, LLMService
from entity_llm_server.engine import BatchingEngine, EngineOverloadedError, Finished

from ..conftest import wait_until
from ..engines import assert_engine_failed, assert_refused_at_capacity, batching_engine, slow_forward

pytestmark = pytest.mark.model

PROMPTS = [
    "def fibonacci(n):",
    "import os\n",
    "class Parser:\n    def __init__(self",
    "# Copyright",
    "for i in range(",
    'if __name__ == "__main__":\n',
    "    return self.",
    "x",
]


async def _run(engine: BatchingEngine, request: EngineRequest) -> Finished:
    events = [event async for event in engine.generate(request)]
    final = events[-1]
    assert isinstance(final, Finished)
    assert sum(isinstance(e, Finished) for e in events) == 1
    return final


def test_concurrent_greedy_streams_equal_each_prompt_served_alone():
    engine = batching_engine()

    async def main() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        await engine.start()
        try:
            alone = [(await _run(engine, EngineRequest(p, max_new_tokens=24))).token_ids for p in PROMPTS]
            together = await asyncio.gather(*(_run(engine, EngineRequest(p, max_new_tokens=24)) for p in PROMPTS))
            return alone, [final.token_ids for final in together]
        finally:
            await engine.close()

    alone, together = asyncio.run(main())
    assert together == alone
    assert all(alone)


def test_over_capacity_is_refused_at_once_with_resource_exhausted(serve):
    engine = batching_engine(max_batch_size=2, max_queue=1, max_new_tokens=400)
    slow_forward(engine, 0.02)  # no stream can end while the refusal is checked
    server = serve(LLMService(engine=engine)).start()
    with LLMClient(server.target, timeout=60) as client:
        streams = [client.generate(p, min_new_tokens=400) for p in PROMPTS[:3]]
        for stream in streams[:2]:
            next(stream)  # two decode together
        # the third waits in the queue: its first piece comes only when a slot frees
        waiter = threading.Thread(target=next, args=(streams[2],), daemon=True)
        waiter.start()
        assert wait_until(lambda: engine.core_state().held == 3, timeout=30)
        assert_refused_at_capacity(client, engine)
        for stream in streams[:2]:
            stream.close()
        waiter.join(timeout=60)
        streams[2].close()
    assert wait_until(lambda: engine.in_flight == 0 and engine.core_state().held == 0, timeout=60)


def test_a_dead_batching_thread_fails_every_stream_with_internal_and_never_hangs(serve):
    engine = batching_engine(max_batch_size=4, max_queue=4, max_new_tokens=400)
    server = serve(LLMService(engine=engine)).start()
    with LLMClient(server.target, timeout=60) as client:
        assert "".join(c.text for c in client.generate("import os\n"))  # healthy first
        slow_forward(engine, 0.005, fail_after=20)
        assert_engine_failed(client, [client.generate(p) for p in PROMPTS[:4]], "out of memory")
    assert not engine.healthy


def test_concurrent_first_starts_launch_one_batching_thread():
    # The first requests to a lazily started engine all call start() at once.
    engine = batching_engine()

    def pumps() -> int:
        return sum(t.name == "entity-llm-cb-results" and t.is_alive() for t in threading.enumerate())

    before = pumps()

    async def main() -> int:
        await asyncio.gather(*(engine.start() for _ in range(6)))
        try:
            return pumps() - before
        finally:
            await engine.close()

    assert asyncio.run(main()) == 1


def test_big_prompts_being_tokenized_count_against_capacity():
    # A prompt over BIG_INPUT_CHARS is tokenized in a worker thread: while it
    # is, its request must already hold a place, or any number of big prompts
    # arriving together would all pass admission.
    engine = batching_engine(max_batch_size=1, max_queue=1)
    big = "x = 1\n" * 4000  # 24,000 characters

    async def one() -> str:
        try:
            events = [e async for e in engine.generate(EngineRequest(big, max_new_tokens=2, truncate_input_tokens=8))]
        except EngineOverloadedError:
            return "refused"
        assert isinstance(events[-1], Finished)
        return "served"

    async def main() -> list[str]:
        await engine.start()
        try:
            return await asyncio.gather(*(one() for _ in range(6)))
        finally:
            await engine.close()

    outcomes = asyncio.run(main())
    assert sorted(outcomes) == ["refused"] * 4 + ["served"] * 2
    assert engine.in_flight == 0
