"""Soak: the server's memory after many requests stays where it was after the first tenth."""

from __future__ import annotations

import asyncio
import time

import grpc

from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

from ..conftest import RunningServer
from .conftest import record, server_rss_mib, size

CONCURRENCY = 16


async def requests(target: str, count: int, offset: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)

        async def one(i: int) -> None:
            request = llm_pb2.GenerateRequest(
                prompt=f"def handler_{i}(request):", max_new_tokens=8, temperature=0.8 if i % 2 else 0.0
            )
            messages = [m async for m in stub.Generate(request, timeout=120)]
            assert messages[-1].generated_token_count == len([t for m in messages for t in m.token_ids])

        for start in range(0, count, CONCURRENCY):
            await asyncio.gather(*(one(offset + i) for i in range(start, min(start + CONCURRENCY, count))))


def test_rss_after_all_requests_is_within_5_percent_of_rss_after_the_first_tenth():
    total = size(1_000, 10_000)
    first = total // 10
    with RunningServer("--max-new-tokens", "8", "--max-batch-size", "16", "--max-queue", "16") as server:
        pid = server.process.pid
        started = time.perf_counter()
        asyncio.run(requests(server.target, first, 0))
        after_first = server_rss_mib(pid)
        asyncio.run(requests(server.target, total - first, first))
        after_all = server_rss_mib(pid)
        seconds = time.perf_counter() - started
        assert server.stop() == 0, server.stderr()
    record(f"soak: requests (8 new tokens, concurrency {CONCURRENCY})", total)
    for name, before, after in zip(("front end", "engine process"), after_first, after_all, strict=True):
        record(f"soak: {name} RSS MiB after {first} / after {total}", f"{before:.1f} / {after:.1f}")
        record(f"soak: {name} growth", f"{(after / before - 1) * 100:+.2f}%")
    record("soak: requests/s", round(total / seconds, 1))
    assert after_all[0] <= after_first[0] * 1.05
    assert after_all[1] <= after_first[1] * 1.05
