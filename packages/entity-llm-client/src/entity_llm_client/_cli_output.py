"""What the `entity-llm` command prints: text for a terminal, or JSON with --json."""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from collections.abc import Iterable
from typing import Any

from ._types import Chunk, Completion, ModelInfo, TokenLogprob, Tokens, Usage


def jsonable(value: Any) -> Any:
    """`value` as JSON can carry it: dataclasses as objects, enums as their values, tuples as arrays."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    return value


def print_stream(stream: Iterable[Chunk], *, as_json: bool, prompt_logprobs: bool) -> None:
    """One sample's text as it comes, then the prompt's scores (if asked) and how it ended (--json: each chunk)."""
    scored: tuple[TokenLogprob, ...] = ()  # the stream's first chunk carries them, printed after the text
    for chunk in stream:
        if as_json:
            print(json.dumps(jsonable(chunk)), flush=True)
            continue
        print(chunk.text, end="", flush=True)
        scored += chunk.prompt_logprobs
        if chunk.finish_reason is not None:
            print()
            if prompt_logprobs:
                print_prompt_logprobs(scored)
            print(f"[{_summary(chunk.finish_reason.value, chunk.usage, chunk.seed)}]", file=sys.stderr)


def _summary(reason: str, usage: Usage | None, seed: int | None) -> str:
    """How a generation ended: its finish reason, token counts and seed."""
    counts = f", {usage.input_tokens} in / {usage.generated_tokens} out" if usage else ""
    return f"{reason}{counts}" + (f", seed {seed}" if seed is not None else "")


def print_samples(samples: list[Completion], *, as_json: bool) -> None:
    """--n above 1: the samples in order, each under a header that says how it ended (--json: one array)."""
    if as_json:
        print(json.dumps(jsonable(samples)), flush=True)
        return
    for index, done in enumerate(samples):
        print(f"--- sample {index} ({_summary(done.finish_reason.value, done.usage, done.seed)}) ---")
        print(done.text, flush=True)


def print_prompt_logprobs(entries: tuple[TokenLogprob, ...]) -> None:
    """The prompt's scores under a header with their sum, one token a line: id, logprob, rank, alternatives."""
    total = sum(entry.logprob for entry in entries)
    print(f"--- prompt logprobs ({len(entries)} tokens after the first, sum {total:.4f}) ---")
    for entry in entries:
        alternatives = ", ".join(f"{alt.token_id} {alt.text!r} {alt.logprob:.4f}" for alt in entry.top_logprobs)
        line = f"{entry.token_id:>8}  {entry.logprob:>9.4f}  rank {entry.rank}"
        print(f"{line}  [{alternatives}]" if alternatives else line, flush=True)


def print_scores(entries: tuple[TokenLogprob, ...], *, as_json: bool) -> None:
    """`score`'s result: the prompt's scores (--json: one array)."""
    if as_json:
        print(json.dumps(jsonable(entries)))
    else:
        print_prompt_logprobs(entries)


def print_tokens(tokens: Tokens, *, as_json: bool) -> None:
    """A text's tokens: their count, then one a line, id and piece."""
    if as_json:
        print(json.dumps({"ids": list(tokens.ids), "pieces": list(tokens.pieces), "count": tokens.count}))
    else:
        print(f"{tokens.count} tokens")
        for token_id, piece in zip(tokens.ids, tokens.pieces, strict=True):
            print(f"{token_id:>8}  {piece!r}")


def print_info(info: ModelInfo, *, as_json: bool) -> None:
    """The served model and the server's limits, one field a line."""
    if as_json:
        print(json.dumps(jsonable(info)))
    else:
        for field in dataclasses.fields(info):
            value = getattr(info, field.name)
            if isinstance(value, tuple):  # a list of ids or names, as a person writes it
                value = ", ".join(str(item) for item in value) or "(none)"
            print(f"{field.name}: {value}")
