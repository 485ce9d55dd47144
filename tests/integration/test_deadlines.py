"""A call's own `timeout=` wins over the client's default deadline, in every method."""

from __future__ import annotations

import asyncio

from entity_llm_client import AsyncLLMClient, LLMClient

from .capturing import CapturingServicer, running

METHODS = ["Generate", "Generate", "Tokenize", "GetModelInfo"]


def _own(left: float | None) -> bool:
    # gRPC sends deadlines rounded up (600 s arrives as up to ~601 s left): loose bounds.
    return left is not None and 100 < left < 700


def _default(left: float | None) -> bool:
    return left is not None and left < 10


def test_sync_calls_take_their_own_timeout_over_the_default():
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=5) as client:
        client.complete("x", timeout=600)
        list(client.generate("x", timeout=600))
        client.tokenize("x", timeout=600)
        client.model_info(timeout=600)
        client.complete("x")
        list(client.generate("x"))
        client.tokenize("x")
        client.model_info()
    own, default = servicer.deadlines[:4], servicer.deadlines[4:8]
    assert [method for method, _ in own] == [method for method, _ in default] == METHODS
    assert all(_own(left) for _, left in own), own
    assert all(_default(left) for _, left in default), default


def test_async_calls_take_their_own_timeout_over_the_default():
    servicer = CapturingServicer()

    async def run() -> None:
        async with AsyncLLMClient(target, timeout=5) as client:
            await client.complete("x", timeout=600)
            [chunk async for chunk in client.generate("x", timeout=600)]
            await client.tokenize("x", timeout=600)
            await client.model_info(timeout=600)

    with running(servicer) as target:
        asyncio.run(run())
    assert [method for method, _ in servicer.deadlines] == METHODS
    assert all(_own(left) for _, left in servicer.deadlines)


def test_without_a_default_a_call_has_no_deadline_unless_it_sets_one():
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target) as client:
        client.model_info()
        client.model_info(timeout=600)
    (_, unset), (_, own) = servicer.deadlines
    assert unset is None
    assert _own(own)
