"""Text in and out of the model: stop sequences, incremental detokenization, big inputs off the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

# Inputs longer than this (characters of prompt or chat messages) are encoded
# in a worker thread: tokenizing megabytes takes seconds, and on the event loop
# it would stall every other stream and health probe meanwhile.
BIG_INPUT_CHARS = 16_384
_T = TypeVar("_T")


async def sized_call(chars: int, work: Callable[..., _T], *args: Any) -> _T:
    """`work(*args)` here for an input of `chars` characters, or in a worker thread past BIG_INPUT_CHARS."""
    return work(*args) if chars <= BIG_INPUT_CHARS else await asyncio.to_thread(work, *args)


def special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids `tokenizer` puts before and after a text (for most causal LMs: one start token)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


class StopMatcher:
    """Finds stop sequences in streamed text, holding back possible beginnings.

    Text that could be the start of a stop sequence is held until the next
    piece shows whether it is; a match trims the text at the stop (or after
    it, when the stop is to be included).
    """

    def __init__(self, stops: Iterable[str], include: bool) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit now, the matched stop or None)."""
        self.held += text
        if not self.stops:
            out, self.held = self.held, ""
            return out, None
        found = [(i, s) for s in self.stops if (i := self.held.find(s)) >= 0]
        if found:
            index, stop = min(found)
            end = index + len(stop) if self.include else index
            out, self.held = self.held[:end], ""
            return out, stop
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, None

    def flush(self) -> str:
        """Release held text at the end of the stream."""
        out, self.held = self.held, ""
        return out


class Decoder:
    """Incremental detokenization with the tokenizer's Rust DecodeStream."""

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        from tokenizers.decoders import DecodeStream  # deferred: no tokenizers work at import

        self._backend = tokenizer.backend_tokenizer
        # Seeded with the prompt so the first piece decodes in context (a
        # leading space, a character begun by the prompt's last bytes).
        self._stream = DecodeStream(ids=list(prompt), skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self._stream.step(self._backend, token) or ""
