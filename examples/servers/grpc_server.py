"""The seed's demo: LLMGRPCAdapter starts LLMService locally and streams a prompt.

    python examples/servers/grpc_server.py [PROMPT]

Needs the entity-llm-server distribution (it provides `grpc_services`).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from grpc_services import llm_pb2, llm_pb2_grpc
from grpc_services.llm_service import LLMService


class LLMGRPCAdapter:
    """Runs an in-process LLMService on a loopback port and streams from it.

    Args:
        service: the servicer to run; the default serves the embedded model.
    """

    def __init__(self, service: LLMService | None = None) -> None:
        self.service = service or LLMService()
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> LLMGRPCAdapter:
        self._server = grpc.aio.server()
        llm_pb2_grpc.add_LLMServiceServicer_to_server(self.service, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
        if self._server is not None:
            await self._server.stop(grace=None)

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        """Yield each generated piece of text for `prompt`."""
        assert self._channel is not None, "use the adapter in `async with`"
        stub = llm_pb2_grpc.LLMServiceStub(self._channel)
        async for response in stub.Generate(llm_pb2.GenerateRequest(prompt=prompt)):
            yield response.token


async def main(prompt: str) -> None:
    async with LLMGRPCAdapter() as adapter:
        print(prompt, end="", flush=True)
        async for token in adapter.stream(prompt):
            print(token, end="", flush=True)
        print()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "def fibonacci(n):"))
