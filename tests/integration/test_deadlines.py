"""A call's own `timeout=` wins over the client's default deadline, in every method; and a call
ends by its deadline even when gRPC does not end it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from entity_llm_client import AsyncLLMClient, DeadlineExceededError, LLMClient, LLMError

from ..conftest import wait_until
from .capturing import REPLY, CapturingServicer, running

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


class Endless(CapturingServicer):
    """Answers nothing, or a stream's first message and then nothing, until the call is cancelled;
    `cancelled` counts the calls it saw cancelled (their handlers freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def _wait(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def reply(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield REPLY[0]
        await self._wait()

    async def Tokenize(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._record("Tokenize", context)
        await self._wait()

    async def GetModelInfo(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._record("GetModelInfo", context)
        await self._wait()


def _undated(details: Any) -> Any:
    # The call's details without its deadline: gRPC then never ends the call, as when it fails to.
    return details._replace(timeout=None)


class _DropDeadline(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_undated(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_undated(details), request)


# grpc.aio files an interceptor under one kind of call only: one class each.
class _AioDropUnaryDeadline(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_undated(details), request)


class _AioDropStreamDeadline(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_undated(details), request)


SHORT = 0.3


def _overdue(outcome: list[object]) -> bool:
    # The client's own error for a call it cancelled past its deadline.
    return [type(o) for o in outcome] == [DeadlineExceededError] and "the client cancelled it" in str(outcome[0])


def _ends(call: Callable[[], object]) -> list[object]:
    """What `call` raised (or returned), if it ends within a hang guard far beyond SHORT + OVERDUE."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert outcome, "the call outlived its deadline"
    return outcome


def test_a_sync_call_grpc_does_not_end_at_its_deadline_is_ended_by_the_client():
    servicer = Endless()
    with running(servicer) as target, grpc.insecure_channel(target) as plain:
        channel = grpc.intercept_channel(plain, _DropDeadline())
        with LLMClient(target, channel=channel) as client:
            outcomes = [
                _ends(lambda: client.complete("x", timeout=SHORT)),
                _ends(lambda: list(client.generate("x", timeout=SHORT))),
                _ends(lambda: client.tokenize("x", timeout=SHORT)),
                _ends(lambda: client.model_info(timeout=SHORT)),
            ]
        assert all(_overdue(o) for o in outcomes), outcomes
        assert [left for _, left in servicer.deadlines] == [None] * 4  # the server was sent none
        assert wait_until(lambda: servicer.cancelled == 4)  # each call was cancelled, not left open


def test_an_async_call_grpc_does_not_end_at_its_deadline_is_ended_by_the_client():
    servicer = Endless()

    async def run(target: str) -> list[object]:
        interceptors = [_AioDropUnaryDeadline(), _AioDropStreamDeadline()]
        async with grpc.aio.insecure_channel(target, interceptors=interceptors) as channel:
            client = AsyncLLMClient(target, channel=channel)
            outcomes: list[object] = []
            for call in (
                lambda: client.complete("x", timeout=SHORT),
                lambda: client.tokenize("x", timeout=SHORT),
                lambda: client.model_info(timeout=SHORT),
            ):
                try:
                    outcomes.append(await asyncio.wait_for(call(), 30))
                except (LLMError, TimeoutError) as error:
                    outcomes.append(error)
            return outcomes

    with running(servicer) as target:
        outcomes = asyncio.run(run(target))
        assert all(_overdue([o]) for o in outcomes), outcomes
        assert [left for _, left in servicer.deadlines] == [None] * 3
        assert wait_until(lambda: servicer.cancelled == 3)


def test_grpc_ends_a_call_at_its_deadline_before_the_client_would():
    # With the deadline on the wire, gRPC's DEADLINE_EXCEEDED comes first; the client's backstop stays quiet.
    servicer = Endless()
    with running(servicer) as target, LLMClient(target) as client:
        outcome = _ends(lambda: client.complete("x", timeout=SHORT))
    assert [type(o) for o in outcome] == [DeadlineExceededError]
    assert not _overdue(outcome), outcome


def test_cancelling_the_task_of_an_async_call_with_a_deadline_is_a_cancellation():
    servicer = Endless()

    async def run(target: str) -> None:
        async with AsyncLLMClient(target) as client:
            task = asyncio.create_task(client.complete("x", timeout=60))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with running(servicer) as target:
        asyncio.run(run(target))
    assert wait_until(lambda: servicer.cancelled == 1)


def test_an_endless_timeout_is_no_deadline_and_later_calls_alarms_still_ring():
    # gRPC fails a call at once when its deadline overflows (past 9e9 s, or infinite): the client
    # sends none. And the sync calls' alarms share one thread, which such a timeout must not end.
    servicer = CapturingServicer()
    with running(servicer) as target, LLMClient(target, timeout=float("inf")) as client:
        assert client.model_info().model_id == "capturing"
        assert client.model_info(timeout=1e10).model_id == "capturing"
        assert client.tokenize("x", timeout=5e9).ids == (5,)
        with pytest.raises(ValueError, match="timeout"):
            client.model_info(timeout=float("nan"))
    assert [left for _, left in servicer.deadlines[:2]] == [None, None]
    servicer = Endless()
    with running(servicer) as target, grpc.insecure_channel(target) as plain:
        channel = grpc.intercept_channel(plain, _DropDeadline())
        with LLMClient(target, channel=channel) as client:
            outcome = _ends(lambda: client.tokenize("x", timeout=SHORT))
        assert _overdue(outcome), outcome
