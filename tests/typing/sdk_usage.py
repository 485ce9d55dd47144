"""Typed use of the client SDK, as a user writes it: `mypy --strict` must pass.

tests/pipeline/test_typing.py also asserts that what the SDK yields is typed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from entity_llm_client import (
    AsyncLLMClient,
    Chunk,
    Completion,
    FieldViolation,
    FinishReason,
    GenerateOptions,
    InvalidArgumentError,
    LLMClient,
    LLMError,
    ModelInfo,
    TokenLogprob,
    Tokens,
    TopLogprob,
    Usage,
)


def stream_sync(target: str, prompt: str) -> str:
    pieces: list[str] = []
    with LLMClient(target, timeout=30) as client:
        for piece in client.generate(prompt):
            chunk: Chunk = piece
            pieces.append(chunk.text)
    return "".join(pieces)


def complete_with_limits(target: str) -> tuple[str, FinishReason, int]:
    with LLMClient(target) as client:
        done: Completion = client.complete("def f(x):", max_new_tokens=32, stop_sequences=["\n\n"], time_limit_ms=500)
        tokens: Tokens = client.tokenize("def f(x):", truncate_input_tokens=4)
        info: ModelInfo = client.model_info()
        assert tokens.count <= 4 <= info.context_length
        return done.text, done.finish_reason, done.usage.generated_tokens


def sample_with_logprobs(target: str) -> tuple[int | None, list[float], list[str]]:
    options: GenerateOptions = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1, "seed": 1234}
    options["top_logprobs"] = 3
    with LLMClient(target, timeout=30, retries=False) as client:
        done: Completion = client.complete("def f(x):", timeout=10, **options)
        entries: tuple[TokenLogprob, ...] = done.logprobs
        top: list[TopLogprob] = [alt for entry in entries for alt in entry.top_logprobs]
        return done.seed, [entry.logprob for entry in entries], [alt.text for alt in top]


def from_token_ids(target: str, ids: list[int]) -> tuple[int | None, FinishReason]:
    options: GenerateOptions = {"stop_token_ids": (304, 11), "ignore_eos": True, "logit_bias": {0: -100.0, 7: 2}}
    options["min_p"], options["typical_p"] = 0.05, None
    options["presence_penalty"], options["frequency_penalty"] = 0.5, 0.25
    with LLMClient(target) as client:
        last: Chunk = list(client.generate(prompt_token_ids=ids, **options))[-1]
        done: Completion = client.complete(prompt_token_ids=ids[:4], stop_token_ids=[304], temperature=0.7)
        stop: int | None = last.stop_token_id
        return stop if stop is not None else done.stop_token_id, done.finish_reason


def several_samples(target: str) -> list[tuple[str, int | None, int]]:
    with LLMClient(target) as client:
        done: list[Completion] = client.samples("def f(x):", n=4, temperature=0.8, seed=7, max_new_tokens=16)
        by_index: dict[int, list[str]] = {}
        for chunk in client.generate(messages=[("user", "Add.")], n=2, temperature=0.8):
            index: int = chunk.index
            by_index.setdefault(index, []).append(chunk.text)
        usage: Usage = done[0].usage
        cached: int = usage.cached_tokens
        return [(sample.text, sample.seed, cached) for sample in done]


def score_choices(target: str, question: str, choices: list[str]) -> list[tuple[float, list[int]]]:
    scored: list[tuple[float, list[int]]] = []
    with LLMClient(target, timeout=30) as client:
        for choice in choices:
            entries: tuple[TokenLogprob, ...] = client.score(f"{question} {choice}", top_logprobs=2)
            ranks: list[int] = [entry.rank for entry in entries]
            scored.append((sum(entry.logprob for entry in entries), ranks))
        first: Chunk = next(client.generate(question, max_new_tokens=0, prompt_logprobs=0))
        options: GenerateOptions = {"prompt_logprobs": 3, "logprobs": True}
        done: Completion = client.complete(prompt_token_ids=[1, 2], **options)
        prompt: tuple[TokenLogprob, ...] = first.prompt_logprobs or done.prompt_logprobs
        generated_ranks: list[int] = [entry.rank for entry in done.logprobs]
        client.score(messages=[("user", question)], truncate_input_tokens=64, timeout=5, metadata=[("x-job", "1")])
        client.score(prompt_token_ids=(1, 2, 3))
        scored.append((sum(entry.logprob for entry in prompt), generated_ranks))
    return scored


def chat(target: str) -> str:
    with LLMClient(target) as client:
        chunks = list(client.generate(messages=[("system", "Answer in Python."), ("user", "Add.")], min_new_tokens=2))
        seed: int | None = chunks[-1].seed
        return "".join(chunk.text for chunk in chunks) + ("" if seed is None else f" (seed {seed})")


def violations(target: str) -> list[str]:
    with LLMClient(target) as client:
        try:
            client.complete("x", stop_sequences=[""])
        except InvalidArgumentError as error:
            found: tuple[FieldViolation, ...] = error.field_violations
            return [f"{v.field}: {v.description}" for v in found]
    return []


async def stream_async(target: str, prompt: str) -> str:
    async with AsyncLLMClient(target, retries=True) as client:
        done: Completion = await client.complete(messages=[("user", prompt)], temperature=0.0, logprobs=True)
        assert done.logprobs or not done.text
        stopped = await client.complete(prompt_token_ids=(1, 2, 3), stop_token_ids=[4], presence_penalty=1.0)
        assert stopped.finish_reason is not FinishReason.STOP_TOKEN or stopped.stop_token_id == 4
        samples: list[Completion] = await client.samples(prompt_token_ids=[1, 2], n=2, timeout=30, top_p=0.9)
        reasons: list[FinishReason] = [sample.finish_reason for sample in samples]
        assert len(reasons) == 2
        assert samples[-1].usage.cached_tokens >= 0
        scored = await client.samples("x", n=2, prompt_logprobs=1, temperature=0.8)
        ranks: list[int] = [entry.rank for entry in scored[0].prompt_logprobs]
        entries: tuple[TokenLogprob, ...] = await client.score(messages=[("user", prompt)], top_logprobs=1)
        assert len(entries) >= len(ranks) or not ranks
        return "".join([piece.text async for piece in client.generate(prompt, timeout=30, top_logprobs=2)])


def main() -> None:
    try:
        print(stream_sync("localhost:50051", "def fibonacci(n):"))
        print(asyncio.run(stream_async("localhost:50051", "import os\n")))
    except LLMError as error:
        print(error.code.name, error.details)


def secured(target: str, ca: Path, api_key: str) -> ModelInfo:
    with LLMClient(
        target, tls=True, root_certificates=ca, api_key=api_key, options=[("grpc.keepalive_time_ms", 20_000)]
    ) as client:
        return client.model_info()


async def secured_async(target: str, ca: bytes, cert: bytes, key: str) -> Tokens:
    async with AsyncLLMClient(target, root_certificates=ca, client_certificate=cert, client_key=key) as client:
        return await client.tokenize("x")
