"""Prefix caching: prompts that begin alike share the KV blocks of that beginning, prefilled once.

On by default (`--prefix-caching off` turns it off). Outputs must not change with it, greedy or
seeded, whatever shares a step; each request reports the prompt tokens it took from the cache; and
finished or cancelled requests give their blocks back.
"""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from entity_llm_server import EngineRequest, LLMService, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingEngine, BatchingSettings, Finished, Sampling

from ..conftest import ServerThread

pytestmark = pytest.mark.model

BLOCK = 16
# A shared preamble of well over a few blocks, then each request's own question.
PREAMBLE = "You are a careful Python reviewer. Read the function, then say what it returns. " * 4
TAILS = [f"def f{i}(x):\n    return x * {i}\n" for i in range(8)]


def engine(prefix_caching: bool) -> BatchingEngine:
    settings = BatchingSettings(max_batch_size=8, max_queue=8, kv_block_size=BLOCK, prefix_caching=prefix_caching)
    built = UnifiedLLMResource(batching=settings).load_engine()
    assert isinstance(built, BatchingEngine)
    return built


def requests() -> list[EngineRequest]:
    greedy = [EngineRequest(PREAMBLE + t, max_new_tokens=12) for t in TAILS[:4]]
    seeded = [
        EngineRequest(PREAMBLE + t, max_new_tokens=12, sampling=Sampling(temperature=0.9, seed=i, top_p=0.95))
        for i, t in enumerate(TAILS[4:])
    ]
    return greedy + seeded


async def final(built, request: EngineRequest) -> Finished:
    events = [event async for event in built.generate(request)]
    assert isinstance(events[-1], Finished)
    return events[-1]


def serve_all(built: BatchingEngine, batch: list[EngineRequest]) -> tuple[list[Finished], list[Finished]]:
    """The batch served all at once, then one request after another."""

    async def main():
        await built.start()
        try:
            together = await asyncio.gather(*(final(built, r) for r in batch))
            alone = [await final(built, r) for r in batch]
            return together, alone
        finally:
            await built.close()

    return asyncio.run(main())


def test_outputs_are_the_same_with_and_without_prefix_caching_and_the_hits_are_counted():
    batch = requests()
    on_together, on_alone = serve_all(engine(True), batch)
    off_together, off_alone = serve_all(engine(False), batch)
    expected = [f.token_ids for f in off_alone]
    assert [f.token_ids for f in off_together] == expected
    assert [f.token_ids for f in on_together] == expected
    assert [f.token_ids for f in on_alone] == expected
    assert all(f.cached_tokens == 0 for f in off_together + off_alone)
    # One after another, every request after the first finds the whole preamble's full blocks.
    ids = engine(True).tokenize(PREAMBLE).ids
    shared = (len(ids) - 1) // BLOCK * BLOCK
    assert shared >= 4 * BLOCK
    assert all(f.cached_tokens >= shared for f in on_alone)  # the first found the earlier, concurrent run's
    assert all(f.cached_tokens % BLOCK == 0 and f.cached_tokens < f.input_tokens for f in on_alone)


def test_finished_and_cancelled_requests_give_their_blocks_back():
    built = engine(True)

    async def main():
        await built.start()
        try:
            await asyncio.gather(*(final(built, r) for r in requests()))
            # Four more, each left after its first piece of text: cancelled in the batch.
            for tail in TAILS[:4]:
                stream = built.generate(EngineRequest(PREAMBLE + tail, max_new_tokens=200))
                await anext(stream)
                await stream.aclose()
            manager = built.batching._manager
            for _ in range(200):  # the batching thread drops cancelled requests at its next step
                if not built.core_state().held:
                    break
                await asyncio.sleep(0.05)
            tables = {name: dict(a.block_table) for name, a in manager.batch_processor.cache.cache_allocators.items()}
            # And a request as long as the context still finds room.
            room = built.max_sequence_tokens
            whole = EngineRequest("", prompt_token_ids=(1,) * (room - 8), max_new_tokens=4)
            return tables, await final(built, whole)
        finally:
            await built.close()

    tables, whole = asyncio.run(main())
    assert tables
    assert all(table == {} for table in tables.values())
    assert whole.generated_tokens == 4


def test_the_wire_and_the_metrics_report_cached_prompt_tokens():
    server = ServerThread(LLMService(UnifiedLLMResource(default_max_new_tokens=4))).start()
    try:
        port = server.server.serve_metrics("127.0.0.1", 0)

        async def call() -> llm_pb2.GenerateResponse:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = llm_pb2_grpc.LLMServiceStub(channel)
                return [m async for m in stub.Generate(llm_pb2.GenerateRequest(prompt=PREAMBLE), timeout=60)][-1]

        first, second = server.call(call()), server.call(call())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop()
    assert first.cached_token_count == 0
    assert second.cached_token_count == (second.input_token_count - 1) // BLOCK * BLOCK > 0
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["entity_llm_prompt_tokens_total"] == first.input_token_count + second.input_token_count
    assert samples["entity_llm_prompt_tokens_cached_total"] == second.cached_token_count
