"""Transport overhead: LLMService on the fake engine vs a bare grpc.aio server.

Every server streams the same GenerateResponse messages (one per piece, no
model); the client is the same raw grpc.aio stub. Two servers of ours: the
servicer alone on `build_server` (the servicer, the engine seam, the server's
options) and `LLMServer`, what the console script runs (plus the operations
interceptor: request ids, API-key check, drain gate, metrics, access log),
without and with per-message timings (on when --metrics-port is set).

    python benchmarks/transport.py [--tokens 2000] [--streams 1,64]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from _common import Row, ratio, report

from entity_llm_server import FakeEngine, LLMServer, LLMService, build_server
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

PIECES = ("def", " fib", "(n", "):", "\n", "    return", " n")
NAMES = {
    "bare": "bare grpc.aio",
    "service": "LLMService+fake",
    "server": "LLMServer+fake",
    "server+metrics": "LLMServer+fake+timings",
}


class BareService(llm_pb2_grpc.LLMServiceServicer):
    """The least a grpc.aio server can do: yield prebuilt-content messages."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    async def Generate(  # noqa: N802
        self, request: llm_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        for i in range(self.tokens):
            await asyncio.sleep(0)  # the fake engine yields to the loop once per token too
            yield llm_pb2.GenerateResponse(token=PIECES[i % len(PIECES)])


def _serve(kind: str, tokens: int, port_out: Any) -> None:
    async def main() -> None:
        service = LLMService(engine=FakeEngine(PIECES, default_max_new_tokens=tokens))
        if kind == "bare":
            server: Any = grpc.aio.server()
            llm_pb2_grpc.add_LLMServiceServicer_to_server(BareService(tokens), server)
        elif kind == "service":
            server = build_server(service)
        else:
            server = LLMServer(service, token_timings=kind == "server+metrics")
        port_out.send(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await asyncio.Event().wait()  # until the process is terminated

    asyncio.run(main())


async def _stream_all(target: str, streams: int) -> tuple[int, float, list[float]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        ttft: list[float] = []

        async def one() -> int:
            started = time.perf_counter()
            count = 0
            async for _ in stub.Generate(llm_pb2.GenerateRequest(prompt="x")):
                if count == 0:
                    ttft.append((time.perf_counter() - started) * 1000)
                count += 1
            return count

        await one()  # warm the connection
        ttft.clear()
        started = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(streams)))
        return sum(counts), time.perf_counter() - started, ttft


def measure(kinds: tuple[str, ...], tokens: int, streams: int, repeats: int) -> dict[str, Row]:
    """Each server in its own process, all up at once; runs interleaved, best of `repeats` each.

    Interleaving spreads the shared machine's slow moments over every server
    instead of charging them to whichever ran then.
    """
    ports: dict[str, int] = {}
    processes = []
    for kind in kinds:
        receive, send = multiprocessing.Pipe(duplex=False)
        process = multiprocessing.Process(target=_serve, args=(kind, tokens, send), daemon=True)
        process.start()
        processes.append(process)
        ports[kind] = receive.recv()
    try:
        best: dict[str, tuple[int, float, list[float]]] = {}
        for _ in range(repeats):
            for kind in kinds:
                result = asyncio.run(_stream_all(f"127.0.0.1:{ports[kind]}", streams))
                if kind not in best or result[1] < best[kind][1]:
                    best[kind] = result
        return {kind: Row("transport", NAMES[kind], streams, *best[kind]) for kind in kinds}
    finally:
        for process in processes:
            process.terminate()
            process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="messages per stream")
    parser.add_argument("--streams", default="1,64")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows: list[Row] = []
    ratios = []
    for streams in (int(s) for s in args.streams.split(",")):
        tokens = args.tokens if streams == 1 else max(args.tokens // 10, 50)
        measured = measure(tuple(NAMES), tokens, streams, args.repeats)
        bare = measured["bare"]
        for kind in ("service", "server", "server+metrics"):
            ours = measured[kind]
            rows.append(ours)
            ratios.append(ratio(f"{NAMES[kind]} / bare at {streams} streams", ours, bare, 0.9))
        rows.append(bare)
    report("transport", rows, ratios, {"tokens_per_stream": args.tokens})


if __name__ == "__main__":
    main()
