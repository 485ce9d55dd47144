"""The real engines' load (decoding, waiting), which metrics read."""

from __future__ import annotations

import asyncio

import pytest

from entity_llm_server import EngineRequest

from ..engines import batching_engine, slow_forward

pytestmark = pytest.mark.model


def test_batching_engine_load_counts_decoding_and_waiting_requests():
    engine = batching_engine(max_batch_size=2, max_queue=4)

    async def consume(request: EngineRequest) -> None:
        async for _ in engine.generate(request):
            pass

    async def run() -> list[tuple[int, int]]:
        await engine.start()
        try:
            seen = [engine.load()]
            slow_forward(engine, 0.02)
            tasks = [asyncio.create_task(consume(EngineRequest(f"x{i}", max_new_tokens=200))) for i in range(5)]
            for _ in range(500):
                await asyncio.sleep(0.01)
                seen.append(engine.load())
                if seen[-1] == (2, 3):
                    break
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            seen.append(engine.load())
            return seen
        finally:
            await engine.close()

    seen = asyncio.run(run())
    assert seen[0] == (0, 0)
    assert (2, 3) in seen, seen  # at most max_batch_size decode; the others wait
    assert all(active <= 2 and active + waiting <= 5 for active, waiting in seen)
    assert seen[-1] == (0, 0)


def test_sequential_engine_load(demo_engine):
    assert demo_engine.load() == (0, 0)
