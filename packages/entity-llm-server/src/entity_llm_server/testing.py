"""For users' tests: a deterministic engine that needs no model and no torch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from .engine import EngineEvent, EngineRequest, Finished, FinishReason, ModelInfo, TextDelta, Tokens

__all__ = ["FakeEngine"]


class FakeEngine:
    """Streams fixed pieces of text at a configurable rate.

    Args:
        pieces: the text pieces to stream, cycled until `max_new_tokens`.
        delay: seconds to wait before each piece (0 yields to the loop only).
        default_max_new_tokens: used when a request leaves the length unset.
    """

    def __init__(
        self,
        pieces: Sequence[str] = ("Hello", ",", " world", "!"),
        *,
        delay: float = 0.0,
        default_max_new_tokens: int | None = None,
    ) -> None:
        if not pieces:
            raise ValueError("pieces must not be empty")
        self.pieces = tuple(pieces)
        self.delay = delay
        self.default_max_new_tokens = default_max_new_tokens or len(self.pieces)
        self.active = 0
        self.started = False

    @property
    def healthy(self) -> bool:
        return self.started

    def info(self) -> ModelInfo:
        return ModelInfo("fake", 4096, len(self.pieces), self.default_max_new_tokens, 4095, (), False, "fake")

    def tokenize(self, text: str, truncate: int | None = None) -> Tokens:
        words = text.split()
        words = words[-truncate:] if truncate else words
        return Tokens(tuple(range(len(words))), tuple(words))

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        limit = request.max_new_tokens or self.default_max_new_tokens
        self.active += 1
        try:
            for i in range(limit):
                await asyncio.sleep(self.delay)
                yield TextDelta(self.pieces[i % len(self.pieces)], (i,))
            yield Finished(FinishReason.MAX_TOKENS, len(request.prompt.split()), limit, tuple(range(limit)))
        finally:
            self.active -= 1

    def occupancy(self) -> tuple[int, int]:
        return (self.active, 0)
