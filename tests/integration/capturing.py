"""A bare grpc.aio LLMService that records what the client sent, decoded by google-protobuf.

The server's generated messages (not the client's betterproto2 ones) read the
wire here, so tests see field presence (`HasField`) as any other server would.
It replies with fixed messages that carry logprobs (with ranks) and a seed,
whatever the real engines do with the request; `ScoringServicer` also scores
the prompt as the server does when a request asks for `prompt_logprobs`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

REPLY = (
    llm_pb2.GenerateResponse(
        token="He",
        token_ids=[1, 2],
        request_id="r-1",
        logprobs=[
            llm_pb2.TokenLogprobs(
                token_id=1,
                logprob=-0.5,
                top_logprobs=[
                    llm_pb2.TopLogprob(token_id=1, logprob=-0.5, text="H"),
                    llm_pb2.TopLogprob(token_id=7, logprob=-1.5, text="J"),
                ],
                rank=1,
            ),
            llm_pb2.TokenLogprobs(token_id=2, logprob=-0.25, rank=2),
        ],
    ),
    llm_pb2.GenerateResponse(
        token="llo",
        token_ids=[3],
        logprobs=[llm_pb2.TokenLogprobs(token_id=3, logprob=-2.0, rank=4096)],
        finish_reason=llm_pb2.FINISH_REASON_MAX_TOKENS,
        input_token_count=4,
        generated_token_count=3,
        request_id="r-1",
        seed=2**64 - 1,
    ),
)


class CapturingServicer(llm_pb2_grpc.LLMServiceServicer):
    """Records each request and the deadline it came with; replies with REPLY.

    Attributes:
        requests: every GenerateRequest received, in order.
        deadlines: (method, seconds left when it arrived, or None) for every call.
        attempts: how many Generate calls arrived.
    """

    def __init__(self) -> None:
        self.requests: list[llm_pb2.GenerateRequest] = []
        self.deadlines: list[tuple[str, float | None]] = []
        self.attempts = 0

    def _record(self, method: str, context: Context) -> None:
        self.deadlines.append((method, context.time_remaining()))

    async def Generate(  # noqa: N802  # the RPC's name in the protocol
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        self.attempts += 1
        self.requests.append(request)
        self._record("Generate", context)
        async for response in self.reply(request, context):
            yield response

    async def reply(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """The stream Generate sends; subclasses change it to fail."""
        for response in REPLY:
            yield response

    async def Tokenize(  # noqa: N802  # the RPC's name in the protocol
        self, request: llm_pb2.TokenizeRequest, context: Context
    ) -> llm_pb2.TokenizeResponse:
        self._record("Tokenize", context)
        return llm_pb2.TokenizeResponse(token_ids=[5], pieces=["x"], token_count=1)

    async def GetModelInfo(  # noqa: N802  # the RPC's name in the protocol
        self, request: llm_pb2.GetModelInfoRequest, context: Context
    ) -> llm_pb2.GetModelInfoResponse:
        self._record("GetModelInfo", context)
        return llm_pb2.GetModelInfoResponse(model_id="capturing", context_length=8)


# The scores of REPLY's 4-token prompt: one entry per token after the first,
# with up to 3 alternatives (a request's prompt_logprobs says how many).
PROMPT_SCORES = (
    (11, -1.5, 2, ((12, -0.25, "b"), (11, -1.5, "a"), (40, -2.0, "x"))),
    (12, -0.25, 1, ((12, -0.25, "b"), (13, -3.0, "c"), (41, -3.5, "y"))),
    (13, -3.0, 7, ((42, -0.125, " z"), (43, -0.5, "\u00e9"), (44, -1.0, "w"))),
)


def scored(request: llm_pb2.GenerateRequest, **fields: Any) -> llm_pb2.GenerateResponse:
    """The message that scores the prompt: PROMPT_SCORES with the alternatives asked for, `fields` set."""
    alternatives = request.prompt_logprobs
    return llm_pb2.GenerateResponse(
        prompt_logprobs=[
            llm_pb2.TokenLogprobs(
                token_id=token_id,
                logprob=logprob,
                rank=rank,
                top_logprobs=[llm_pb2.TopLogprob(token_id=t, logprob=lp, text=x) for t, lp, x in top[:alternatives]],
            )
            for token_id, logprob, rank, top in PROMPT_SCORES
        ],
        **fields,
    )


class ScoringServicer(CapturingServicer):
    """Scores the prompt as the server does when a request asks for prompt_logprobs.

    The scores come in a message of their own before any text; then REPLY
    follows, or (max_new_tokens 0) only a last message that generated nothing.
    """

    async def reply(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        if not request.HasField("prompt_logprobs"):
            async for response in super().reply(request, context):
                yield response
            return
        yield scored(request, request_id="r-1")
        if request.HasField("max_new_tokens") and request.max_new_tokens == 0:
            yield llm_pb2.GenerateResponse(
                finish_reason=llm_pb2.FINISH_REASON_MAX_TOKENS,
                input_token_count=4,
                generated_token_count=0,
                request_id="r-1",
            )
            return
        for response in REPLY:
            yield response


@contextmanager
def running(servicer: llm_pb2_grpc.LLMServiceServicer) -> Iterator[str]:
    """Serve `servicer` on 127.0.0.1:0 from its own thread and event loop; yield the target."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        try:
            server = grpc.aio.server()
            llm_pb2_grpc.add_LLMServiceServicer_to_server(servicer, server)
            port.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            stop.append(asyncio.Event())
        finally:
            ready.set()  # on failure too: the caller then finds no port
        await stop[0].wait()
        await server.stop(grace=None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), name="capturing-server", daemon=True)
    thread.start()
    try:
        ready.wait(timeout=30)
        assert port, "the capturing server did not start"
        yield f"127.0.0.1:{port[0]}"
    finally:
        if stop:
            loop.call_soon_threadsafe(stop[0].set)
        thread.join(timeout=30)
        loop.close()
