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
