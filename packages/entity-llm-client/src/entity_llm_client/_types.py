"""Typed values the client returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of generated text.

    `str(chunk)` is its text, so `print(chunk, end="")` prints the stream.

    Attributes:
        text: the decoded text; never splits a multi-byte UTF-8 character.
    """

    text: str

    def __str__(self) -> str:
        return self.text
