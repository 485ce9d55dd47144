"""Engines on the embedded model for tests: sized small, and a forward pass that can be slowed or broken."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from entity_llm_client import LLMClient, LLMError, OverloadedError
from entity_llm_server import EngineRequest, UnifiedLLMResource
from entity_llm_server.engine import BatchingEngine, BatchingSettings, CoreState, Finished, FrontEnd, TextDelta

from .conftest import wait_until

# Every engine that serves the real model: continuous batching in this
# process, the same in an engine process of its own (the console script's
# default), padded batches on the model's own cache, and one request at a time.
ENGINE_KINDS = ("batching", "process", "padded", "sequential")

T = TypeVar("T")

# Every engine made here, in order: tests/conftest.py's `_close_engines` closes
# those a test made once it is over (a started engine keeps threads, and a core
# process, until it is closed).
MADE: list[FrontEnd] = []


def load_engine(kind: str, max_batch_size: int = 8, max_queue: int = 8, max_new_tokens: int = 16) -> FrontEnd:
    """The engine `kind` (one of ENGINE_KINDS) on the embedded default model, not started."""
    settings = BatchingSettings(max_batch_size=max_batch_size, max_queue=max_queue)
    resource = UnifiedLLMResource(
        default_max_new_tokens=max_new_tokens,
        batching=settings,
        engine=kind if kind in ("padded", "sequential") else "batching",
        engine_process=kind == "process",
    )
    engine = resource.load_engine()
    assert isinstance(engine, FrontEnd)
    MADE.append(engine)
    names = {"batching": "BatchingEngine", "process": "ProcessEngine", "padded": "PaddedEngine"}
    assert type(engine).__name__ == names.get(kind, "TransformersEngine")
    return engine


# Decode steps a core may take to drop every request of clients that left:
# tests that use it give each request far more steps of work than this.
BOUND = 100


def wait_for_core(engine: FrontEnd, held: Callable[[int], bool], timeout: float = 120) -> CoreState:
    """The core's state once its held count satisfies `held` (`timeout` seconds is only a hang guard)."""
    seen: list[CoreState] = []

    def check() -> bool:
        seen.append(engine.core_state())
        return held(seen[-1].held)

    assert wait_until(check, timeout=timeout), f"the core still holds {seen[-1].held} requests"
    return seen[-1]


def assert_dropped_within_bound(engine: FrontEnd, before: CoreState) -> None:
    """Every request leaves the core within BOUND decode steps of `before` (read just before the clients left)."""
    dropped = wait_for_core(engine, lambda held: held == 0)
    steps = dropped.steps - before.steps
    assert steps <= BOUND, f"the core took {steps} decode steps to drop {before.held} abandoned requests"


def batching_engine(max_batch_size: int = 8, max_queue: int = 8, max_new_tokens: int = 16) -> BatchingEngine:
    """A continuous-batching engine on the embedded default model (not started)."""
    settings = BatchingSettings(max_batch_size=max_batch_size, max_queue=max_queue)
    engine = UnifiedLLMResource(default_max_new_tokens=max_new_tokens, batching=settings).load_engine()
    assert isinstance(engine, BatchingEngine)
    MADE.append(engine)
    return engine


def slow_forward(engine: BatchingEngine, seconds: float, fail_after: int | None = None) -> None:
    """Make every forward pass take `seconds` more (holding requests in flight);
    with `fail_after`, the passes after that many raise a CUDA-like OOM."""
    model, forward, calls = engine.model, engine.model.forward, [0]

    def slow(*args, **kwargs):
        calls[0] += 1
        if fail_after is not None and calls[0] > fail_after:
            raise RuntimeError("CUDA out of memory (injected)")
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow


def forced_forward(engine: FrontEnd, token: int) -> None:
    """Make the engine's model want `token` at every step (its logit raised by 1000)."""
    model: Any = getattr(engine, "model")  # noqa: B009  # every front end over a model in this process has one
    forward = model.forward

    def forcing(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        out.logits[..., token] += 1000.0
        return out

    model.forward = forcing


def held_forward(engine: BatchingEngine, gate: threading.Event) -> None:
    """Make every forward pass wait for `gate` (a kernel that does not return, until it does)."""
    forward = engine.model.forward

    def held(*args, **kwargs):
        gate.wait(120)
        return forward(*args, **kwargs)

    engine.model.forward = held


def assert_engine_failed(client: LLMClient, streams: Iterable[Iterator[object]], cause: str) -> None:
    """Every open stream ends with INTERNAL naming `cause`, and so does the next request: never a hang."""
    for stream in streams:
        with pytest.raises(LLMError) as caught:
            list(stream)
        assert caught.value.code is grpc.StatusCode.INTERNAL
        assert cause in caught.value.details
    with pytest.raises(LLMError) as later:
        list(client.generate("after the failure"))
    assert later.value.code is grpc.StatusCode.INTERNAL
    assert "failed" in later.value.details


def assert_refused_at_capacity(client: LLMClient, engine: BatchingEngine) -> None:
    """With the engine full, one request more is refused at once: RESOURCE_EXHAUSTED, saying why.

    "At once": the core still holds every request it would have waited for,
    before and after the refusal (none ended to make room for it).
    """
    before = engine.core_state()
    with pytest.raises(OverloadedError) as caught:
        next(client.generate("one too many"))
    after = engine.core_state()
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "capacity" in caught.value.details
    assert before.held == after.held == engine.capacity
    assert engine.in_flight == engine.capacity


async def run(engine: FrontEnd, request: EngineRequest) -> tuple[str, Finished, list[TextDelta]]:
    """One generation's text, its Finished event, and its text deltas."""
    events = [event async for event in engine.generate(request)]
    final = events[-1]
    assert isinstance(final, Finished)
    deltas = [e for e in events[:-1] if isinstance(e, TextDelta)]
    return "".join(d.text for d in deltas), final, deltas


def serving(engine: FrontEnd, coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Start `engine`, run `coro_fn()` on a fresh event loop, close the engine; the coroutine's result."""

    async def main() -> T:
        await engine.start()
        try:
            return await coro_fn()
        finally:
            await engine.close()

    return asyncio.run(main())
