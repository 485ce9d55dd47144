"""Engines on the embedded model for tests: sized small, and a forward pass that can be slowed or broken."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import grpc
import pytest

from entity_llm_client import LLMClient, LLMError, OverloadedError
from entity_llm_server import UnifiedLLMResource
from entity_llm_server.engine import BatchingEngine, BatchingSettings


def batching_engine(max_batch_size: int = 8, max_queue: int = 8, max_new_tokens: int = 16) -> BatchingEngine:
    """A continuous-batching engine on the embedded default model (not started)."""
    settings = BatchingSettings(max_batch_size=max_batch_size, max_queue=max_queue)
    engine = UnifiedLLMResource(default_max_new_tokens=max_new_tokens, batching=settings).load_engine()
    assert isinstance(engine, BatchingEngine)
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


def assert_refused_at_capacity(client: LLMClient) -> None:
    """One request more than the server holds is refused at once: RESOURCE_EXHAUSTED, saying why."""
    started = time.monotonic()
    with pytest.raises(OverloadedError) as caught:
        next(client.generate("one too many"))
    assert time.monotonic() - started < 10  # refused, not queued behind the work in flight
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "capacity" in caught.value.details
