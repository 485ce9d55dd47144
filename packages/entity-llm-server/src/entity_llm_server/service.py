"""LLMService: translates protobuf <-> engine types, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from ._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from .engine import Engine, EngineRequest, TextDelta
from .errors import translate_errors
from .resource import UnifiedLLMResource


class LLMService(llm_pb2_grpc.LLMServiceServicer):
    """The `entity.grpc.LLMService` servicer.

    Args:
        resource: where the model comes from; None serves the embedded
            default model. The model loads on the first request unless the
            server loaded it before serving (the console script does).
        engine: an already constructed engine (a fake one in transport tests);
            it takes the place of `resource`.
    """

    def __init__(self, resource: UnifiedLLMResource | None = None, *, engine: Engine | None = None) -> None:
        if resource is not None and engine is not None:
            raise ValueError("pass a resource or an engine, not both")
        self.resource = resource if resource is not None or engine is not None else UnifiedLLMResource()
        self._engine = engine

    async def engine(self) -> Engine:
        """The started engine, loading the model on first use."""
        if self._engine is None:
            assert self.resource is not None
            return await self.resource.engine()
        await self._engine.start()
        return self._engine

    @translate_errors
    async def Generate(  # noqa: N802  # the RPC's name in the protocol
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        engine = await self.engine()
        # aclosing: a client that leaves closes the engine's stream at once.
        async with aclosing(engine.generate(EngineRequest(prompt=request.prompt))) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    yield llm_pb2.GenerateResponse(token=event.text)
