"""Load: many more concurrent streams than the server admits; every one ends cleanly."""

from __future__ import annotations

import asyncio
import time

import grpc

from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

from ..conftest import RunningServer
from .conftest import record, server_rss_mib, size

STREAMS = 256
UNSPECIFIED = llm_pb2.FINISH_REASON_UNSPECIFIED


async def burst(target: str, streams: int, channels: int = 8) -> list[grpc.StatusCode]:
    """`streams` concurrent Generate calls over a few channels; each stream's final status."""
    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [llm_pb2_grpc.LLMServiceStub(c) for c in opened]

    async def one(i: int) -> grpc.StatusCode:
        request = llm_pb2.GenerateRequest(prompt=f"def f{i}(x):", max_new_tokens=16)
        try:
            messages = [m async for m in stubs[i % channels].Generate(request, timeout=120)]
        except grpc.aio.AioRpcError as error:
            return error.code()
        finals = [m for m in messages if m.finish_reason != UNSPECIFIED]
        assert len(finals) == 1, "an OK stream ends with exactly one final message"
        assert finals[0] is messages[-1]
        return grpc.StatusCode.OK

    try:
        return await asyncio.gather(*(one(i) for i in range(streams)))
    finally:
        await asyncio.gather(*(c.close() for c in opened))


def test_256_streams_against_a_smaller_server_end_ok_or_refused_and_memory_stays_flat():
    waves = size(2, 8)
    with RunningServer("--max-batch-size", "8", "--max-queue", "24", "--max-new-tokens", "16") as server:
        pid = server.process.pid
        rss: list[float] = []  # front end + engine process
        ok = refused = 0
        started = time.perf_counter()
        for _ in range(waves):
            codes = asyncio.run(burst(server.target, STREAMS))
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
            ok += codes.count(grpc.StatusCode.OK)
            refused += codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
            rss.append(sum(server_rss_mib(pid)))
        seconds = time.perf_counter() - started
        assert server.stop() == 0, server.stderr()
    assert ok >= waves * 32  # at least the admitted ones of each wave finished
    assert refused > 0  # and the bound was really hit
    # Memory is bounded: later waves do not grow the server past the first.
    assert rss[-1] <= rss[0] * 1.05, rss
    record("load: waves of 256 streams (max batch 8 + queue 24)", waves)
    record("load: OK / RESOURCE_EXHAUSTED", f"{ok} / {refused}")
    record("load: server RSS MiB (front end + engine process) after each wave", [round(r) for r in rss])
    record("load: seconds", round(seconds, 1))
