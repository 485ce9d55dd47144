"""Transport overhead: LLMService on the fake engine vs a bare grpc.aio server.

Every server streams the same GenerateResponse messages (one per piece, each
with its token id, then a last message with the finish reason and the counts;
no model); the client is the same raw grpc.aio stub. Two servers of ours: the
servicer alone on `build_server` (the servicer, the engine seam, the server's
options) and `LLMServer`, what the console script runs (plus the operations
interceptor: request ids, API-key check, drain gate, metrics, access log),
without and with per-message timings (on when --metrics-port is set), and
with OpenTelemetry tracing (a span per RPC, batched to an exporter that drops
them: the server's own cost, not a collector's).

Tokens are the token ids the messages carry (the last message carries none),
and every stream must bring exactly the ids asked for. Each round warms every
server up with one stream, then times the concurrent streams; rounds are
interleaved across the servers and each keeps its best.

    python benchmarks/transport.py [--tokens 2000] [--streams 1,64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from _common import Row, interleaved, ratio, report

from entity_llm_server import LLMServer, LLMService, build_server
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.testing import FakeEngine
from entity_llm_server.tracing import Tracing

PIECES = ("def", " fib", "(n", "):", "\n", "    return", " n")
NAMES = {
    "bare": "bare grpc.aio",
    "service": "LLMService+fake",
    "server": "LLMServer+fake",
    "server+metrics": "LLMServer+fake+timings",
    "server+tracing": "LLMServer+fake+tracing",
}
REQUEST_ID = "0" * 32  # as long as the ids the server makes


class BareService(llm_pb2_grpc.LLMServiceServicer):
    """The least a grpc.aio server can do: yield prebuilt copies of the messages LLMService sends."""

    def __init__(self, tokens: int) -> None:
        pieces = [llm_pb2.GenerateResponse(token=PIECES[i % len(PIECES)], token_ids=[i]) for i in range(tokens)]
        pieces[0].request_id = REQUEST_ID
        last = llm_pb2.GenerateResponse(
            finish_reason=llm_pb2.FINISH_REASON_MAX_TOKENS,
            input_token_count=1,
            generated_token_count=tokens,
            request_id=REQUEST_ID,
        )
        self.messages = (*pieces, last)

    async def Generate(  # noqa: N802
        self, request: llm_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        for message in self.messages:
            await asyncio.sleep(0)  # the fake engine yields to the loop once per event too
            yield message


def _dropping_provider() -> Any:
    """A TracerProvider that batches spans, as the OTLP one does, to an exporter that drops them."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return provider


def _serve(kind: str, tokens: int, port_out: Any) -> None:
    async def main() -> None:
        service = LLMService(engine=FakeEngine(PIECES, default_max_new_tokens=tokens))
        if kind == "bare":
            server: Any = grpc.aio.server()
            llm_pb2_grpc.add_LLMServiceServicer_to_server(BareService(tokens), server)
        elif kind == "service":
            server = build_server(service)
        elif kind == "server+tracing":
            server = LLMServer(service, token_timings=False, tracing=Tracing(_dropping_provider()))
        else:
            server = LLMServer(service, token_timings=kind == "server+metrics")
        port_out.send(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await asyncio.Event().wait()  # until the process is terminated

    asyncio.run(main())


async def _round(target: str, streams: int, tokens: int, method: str) -> Row:
    """One round against one server: a warm-up stream, then `streams` concurrent ones, timed."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        ttft: list[float] = []

        async def one(started: float) -> int:
            count = 0
            async for response in stub.Generate(llm_pb2.GenerateRequest(prompt="x")):
                if response.token_ids and not count:
                    ttft.append((time.perf_counter() - started) * 1000)
                count += len(response.token_ids)
            if count != tokens:
                raise SystemExit(f"{method}: a stream brought {count} token ids, not {tokens}")
            return count

        await one(time.perf_counter())  # the warm-up: connects the channel
        ttft.clear()
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(started) for _ in range(streams)))
        return Row("transport", method, streams, sum(counts), time.perf_counter() - started, ttft)


def measure(kinds: tuple[str, ...], tokens: int, streams: int, repeats: int) -> dict[str, Row]:
    """Each server in its own process, all up at once; interleaved rounds, best of `repeats` each."""
    ports: dict[str, int] = {}
    processes = []
    for kind in kinds:
        receive, send = multiprocessing.Pipe(duplex=False)
        process = multiprocessing.Process(target=_serve, args=(kind, tokens, send), daemon=True)
        process.start()
        processes.append(process)
        ports[kind] = receive.recv()

    def side(kind: str) -> Callable[[], Row]:
        return lambda: asyncio.run(_round(f"127.0.0.1:{ports[kind]}", streams, tokens, NAMES[kind]))

    try:
        return interleaved({kind: side(kind) for kind in kinds}, repeats)
    finally:
        for process in processes:
            process.terminate()
            process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000, help="messages per stream at 1 stream (a tenth beyond)")
    parser.add_argument("--streams", default="1,64")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each server keeps its best")
    args = parser.parse_args()
    rows: list[Row] = []
    ratios = []
    for streams in (int(s) for s in args.streams.split(",")):
        tokens = args.tokens if streams == 1 else max(args.tokens // 10, 50)
        measured = measure(tuple(NAMES), tokens, streams, args.repeats)
        bare = measured["bare"]
        for kind in ("service", "server", "server+metrics", "server+tracing"):
            ours = measured[kind]
            rows.append(ours)
            ratios.append(ratio(f"{NAMES[kind]} / bare at {streams} streams", ours, bare, 0.9))
        rows.append(bare)
        on, off = measured["server+tracing"], measured["server"]
        ratios.append(ratio(f"tracing on / off at {streams} streams", on, off, 0.9))
    report("transport", rows, ratios, {"args": vars(args)})


if __name__ == "__main__":
    main()
