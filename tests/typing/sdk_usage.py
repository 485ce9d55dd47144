"""Typed use of the client SDK, as a user writes it: `mypy --strict` must pass.

tests/pipeline/test_typing.py also asserts that what the SDK yields is typed.
"""

from __future__ import annotations

import asyncio

from entity_llm_client import AsyncLLMClient, Chunk, LLMClient, LLMError


def stream_sync(target: str, prompt: str) -> str:
    pieces: list[str] = []
    with LLMClient(target, timeout=30) as client:
        for piece in client.generate(prompt):
            chunk: Chunk = piece
            pieces.append(chunk.text)
    return "".join(pieces)


async def stream_async(target: str, prompt: str) -> str:
    async with AsyncLLMClient(target) as client:
        return "".join([piece.text async for piece in client.generate(prompt, timeout=30)])


def main() -> None:
    try:
        print(stream_sync("localhost:50051", "def fibonacci(n):"))
        print(asyncio.run(stream_async("localhost:50051", "import os\n")))
    except LLMError as error:
        print(error.code.name, error.details)
