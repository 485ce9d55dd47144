"""For users' tests: a deterministic engine that needs no model and no torch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from .engine import EngineEvent, EngineRequest, Finished, FinishReason, ModelInfo, Scored, TextDelta, Tokens
from .engine.sampling import TokenLogprob

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
        """The pieces, cycled to the request's length; each of `request.n` samples streams its own copy
        (interleaved, marked with its index); `prompt_logprobs` scores each word of the prompt after the
        first at -1.0 (rank 1) first; a max_new_tokens of 0 only scores."""
        limit = self.default_max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
        words = len(request.prompt.split())
        self.active += 1
        try:
            if (top := request.sampling.prompt_logprobs) is not None:
                alternatives = tuple((token, -1.0) for token in range(top))
                entries = tuple(TokenLogprob(i, -1.0, alternatives, rank=1) for i in range(1, words))
                yield Scored(entries)
            for i in range(limit):
                await asyncio.sleep(self.delay)
                for index in range(request.n):
                    yield TextDelta(self.pieces[i % len(self.pieces)], (i,), index=index)
            for index in range(request.n):
                yield Finished(FinishReason.MAX_TOKENS, words, limit, tuple(range(limit)), index=index)
        finally:
            self.active -= 1

    def occupancy(self) -> tuple[int, int]:
        return (self.active, 0)
