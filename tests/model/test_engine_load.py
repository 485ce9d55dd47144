"""The real engines' load (decoding, waiting), which metrics read."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys

import pytest

from entity_llm_server import EngineRequest
from entity_llm_server.engine import Sampling
from entity_llm_server.engine.allocator import operator_choice

from ..conftest import wait_until
from ..engines import batching_engine, load_engine

pytestmark = pytest.mark.model


async def _loads_while_serving(engine, requests: int, wanted: tuple[int, int]) -> list[tuple[int, int]]:
    """The engine's load before, while `requests` long requests run (until `wanted` is seen), and after."""

    async def consume(request: EngineRequest) -> None:
        async for _ in engine.generate(request):
            pass

    await engine.start()
    try:
        seen = [engine.occupancy()]
        long = Sampling(min_new_tokens=400)
        tasks = [
            asyncio.create_task(consume(EngineRequest(f"x{i}", max_new_tokens=400, sampling=long)))
            for i in range(requests)
        ]
        deadline = asyncio.get_running_loop().time() + 60  # a hang guard: the load is polled until it shows
        while seen[-1] != wanted and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
            seen.append(engine.occupancy())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The sequential engine counts a request until its worker notices the cancel, a step later.
        await asyncio.to_thread(wait_until, lambda: engine.occupancy() == (0, 0), 60)
        seen.append(engine.occupancy())
        return seen
    finally:
        await engine.close()


def test_batching_engine_load_counts_decoding_and_waiting_requests():
    engine = batching_engine(max_batch_size=2, max_queue=4)
    seen = asyncio.run(_loads_while_serving(engine, 5, (2, 3)))
    assert seen[0] == (0, 0)
    assert (2, 3) in seen, seen  # at most max_batch_size decode; the others wait
    assert all(active <= 2 and active + waiting <= 5 for active, waiting in seen)
    assert seen[-1] == (0, 0)


def test_sequential_engine_load_counts_one_decoding_and_the_rest_waiting():
    engine = load_engine("sequential")
    seen = asyncio.run(_loads_while_serving(engine, 3, (1, 2)))
    assert seen[0] == (0, 0)
    assert (1, 2) in seen, seen
    assert all(active <= 1 and active + waiting <= 3 for active, waiting in seen)
    assert seen[-1] == (0, 0)


def test_the_process_that_loads_the_model_keeps_what_its_steps_free():
    """Loading the model sets the allocator up for its steps (engine/allocator.py: tests/unit/test_allocator.py
    shows what that does), in the engine process and in a server that runs the model itself alike."""
    code = (
        "from entity_llm_server import UnifiedLLMResource\n"
        "from entity_llm_server.engine import allocator\n"
        "assert allocator.state() is None, allocator.state()\n"
        "UnifiedLLMResource().load_model()\n"
        "print(allocator.state())\n"
    )
    env = {k: v for k, v in os.environ.items() if operator_choice({k: v}) is None}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = "freed memory kept (mmap and trim thresholds set)" if platform.libc_ver()[0] == "glibc" else "left alone"
    assert out.stdout.strip().startswith(expected), out.stdout
