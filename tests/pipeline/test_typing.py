"""mypy --strict passes on typed SDK use, and what the SDK yields is typed."""

from __future__ import annotations

import pytest
from mypy import api

from .conftest import ROOT

pytestmark = pytest.mark.pipeline


def test_sdk_usage_passes_mypy_strict():
    out, err, code = api.run(["--strict", "--no-incremental", str(ROOT / "tests" / "typing" / "sdk_usage.py")])
    assert code == 0, out + err


def test_streamed_chunks_are_typed(tmp_path):
    source = tmp_path / "reveal.py"
    source.write_text(
        "from entity_llm_client import AsyncLLMClient, LLMClient\n"
        "async def f(a: AsyncLLMClient) -> None:\n"
        "    async for chunk in a.generate('x'):\n"
        "        reveal_type(chunk)\n"
        "for piece in LLMClient('t').generate('x'):\n"
        "    reveal_type(piece)\n"
    )
    out, _, _ = api.run(["--strict", "--no-incremental", str(source)])
    assert out.count('Revealed type is "entity_llm_client._types.Chunk"') == 2, out


def test_new_fields_and_parameters_are_typed(tmp_path):
    lines = {
        "from entity_llm_client import InvalidArgumentError, LLMClient": None,
        "client = LLMClient('t')": None,
        "done = client.complete(messages=[('user', 'hi')], temperature=0.5, seed=1, logprobs=True)": None,
        "reveal_type(done.seed)": 'Revealed type is "int | None"',
        "reveal_type(done.logprobs[0].top_logprobs[0])": 'Revealed type is "entity_llm_client._types.TopLogprob"',
        "reveal_type(next(client.generate('x')).logprobs)": (
            'Revealed type is "tuple[entity_llm_client._types.TokenLogprob, ...]"'
        ),
        "def f(error: InvalidArgumentError) -> None: reveal_type(error.field_violations)": (
            'Revealed type is "tuple[entity_llm_client._errors.FieldViolation, ...]"'
        ),
        "client.complete('x', temprature=0.5)": 'Unexpected keyword argument "temprature"',
        "client.complete('x', top_k='40')": 'Argument "top_k" to "complete" of "LLMClient" has incompatible type "str"',
        "client.complete(messages=['hi'])": 'has incompatible type "str"; expected "tuple[str, str]"',
        "client.complete('x', json_schema={'type': 'object'}, max_new_tokens=8)": None,
        "client.complete('x', choice=['a', 'b'])": None,
        "client.complete('x', regex=3)": 'Argument "regex" to "complete" of "LLMClient" has incompatible type "int"',
        "reveal_type(client.model_info().constraint_kinds)": 'Revealed type is "tuple[str, ...]"',
    }
    source = tmp_path / "reveal.py"
    source.write_text("".join(f"{line}\n" for line in lines))
    out, _, _ = api.run(["--strict", "--no-incremental", str(source)])
    for number, expected in enumerate(lines.values(), start=1):
        found = [line for line in out.splitlines() if line.startswith(f"{source}:{number}:")]
        if expected is None:
            assert not found, out
        else:
            assert any(expected in line for line in found), f"line {number}: {expected}\n{out}"
