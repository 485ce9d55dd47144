"""The embedded default model through the real loading path, engine and server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

import entity_llm_client as sdk
from entity_llm_client import InvalidArgumentError, LLMClient
from entity_llm_server import EngineRequest, LLMService, TransformersEngine, UnifiedLLMResource, default_model_path
from entity_llm_server.engine import Finished, FinishReason, TextDelta

from ..engines import ENGINE_KINDS, load_engine
from .scripted import ScriptedLM

pytestmark = pytest.mark.model

UTF8_TEXT = "naïve café — 日本語 😀👍🏽"


def _collect(engine: TransformersEngine, request: EngineRequest) -> list[object]:
    async def run() -> list[object]:
        await engine.start()
        try:
            return [event async for event in engine.generate(request)]
        finally:
            await engine.close()

    return asyncio.run(run())


def test_default_model_is_small_and_loads_through_from_pretrained(demo_engine):
    folder = default_model_path()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 15 * 1024 * 1024
    assert demo_engine.model.config.model_type == "llama"
    assert demo_engine.tokenizer.is_fast


@pytest.mark.parametrize("kind", ENGINE_KINDS)
def test_greedy_stream_matches_transformers_generate_on_every_engine(demo_engine, kind):
    prompt = "def fibonacci(n):"
    events = _collect(load_engine(kind), EngineRequest(prompt=prompt, max_new_tokens=20))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    final = events[-1]
    assert isinstance(final, Finished)
    assert sum(isinstance(e, Finished) for e in events) == 1

    tok, model = demo_engine.tokenizer, demo_engine.model
    # As a transformers user runs it: `tokenizer(prompt)`, its start token included.
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    expected_ids = reference[0, ids.shape[1] :].tolist()
    assert list(final.token_ids) == expected_ids
    expected_text = tok.decode([t for t in expected_ids if t not in demo_engine.eos_ids], skip_special_tokens=True)
    assert "".join(d.text for d in deltas) == expected_text
    assert expected_text.startswith(" return fibonic (but not in the case)."), "docs/server.md's greedy sample"


def test_multibyte_text_is_never_split(demo_engine, serve):
    tok = demo_engine.tokenizer
    ids = tok(UTF8_TEXT, add_special_tokens=False)["input_ids"]
    # The test means something only if some token is a partial UTF-8 sequence.
    naive = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in naive)

    eos = next(iter(demo_engine.eos_ids))
    model = ScriptedLM([*ids, eos], vocab_size=len(tok), eos_id=eos)
    server = serve(LLMService(engine=TransformersEngine(model, tok))).start()
    with LLMClient(server.target, timeout=30) as client:
        chunks = list(client.generate("text:"))
    pieces = [chunk.text for chunk in chunks[:-1]]
    assert "".join(pieces) == UTF8_TEXT
    assert all(piece and "\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 1
    # every generated id is accounted for: text pieces, then the EOS in the last message
    assert [i for c in chunks for i in c.token_ids] == [*ids, eos]
    assert chunks[-1].finish_reason is sdk.FinishReason.EOS


def test_eos_ends_the_stream_with_reason_eos(demo_engine):
    tok = demo_engine.tokenizer
    eos = next(iter(demo_engine.eos_ids))
    ids = tok(" x = 1", add_special_tokens=False)["input_ids"]
    engine = TransformersEngine(ScriptedLM([*ids, eos], len(tok), eos), tok, default_max_new_tokens=100)
    events = _collect(engine, EngineRequest(prompt="a"))
    final = events[-1]
    assert isinstance(final, Finished)
    assert final.reason is FinishReason.EOS
    assert final.generated_tokens == len(ids) + 1
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == " x = 1"


def test_a_prompt_longer_than_the_context_is_invalid_argument(serve):
    resource = UnifiedLLMResource(default_max_new_tokens=4)
    server = serve(LLMService(resource)).start()
    with LLMClient(server.target, timeout=60) as client, pytest.raises(InvalidArgumentError) as caught:
        list(client.generate("x = 1\n" * 5000))
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in caught.value.details
    with LLMClient(server.target, timeout=60) as client:
        assert "".join(c.text for c in client.generate("def f():"))


def test_a_prompt_is_encoded_with_exactly_one_start_token_which_truncation_keeps(demo_engine):
    tok = demo_engine.tokenizer
    bos = tok.bos_token_id
    text = tok("def f(x):\n    return x", add_special_tokens=False)["input_ids"]
    assert demo_engine.encode("def f(x):\n    return x") == [bos, *text]
    # A caller that wrote the start token itself does not get a second one.
    assert demo_engine.encode(tok.bos_token + "def f(x):\n    return x") == [bos, *text]
    assert demo_engine.encode("def f(x):\n    return x", 3) == [bos, *text[-2:]]
    assert demo_engine.encode(tok.bos_token + "def f(x):\n    return x", 3) == [bos, *text[-2:]]
    assert demo_engine.encode("def f(x):\n    return x", specials=False) == text
    # A limit above the prompt's length keeps all of it (found by the long fuzz: a limit two
    # tokens above it kept only the last two).
    for extra in (1, 2, 50):
        assert demo_engine.encode("def f(x):\n    return x", len(text) + extra) == [bos, *text]
    # A rendered chat template writes its own start token: truncation keeps it too.
    rendered = demo_engine.render((("user", "Print hello, then print goodbye."),))
    kept = demo_engine.encode(rendered, 4, specials=False)
    assert len(kept) == 4
    assert kept[0] == bos
    assert kept[1:] == demo_engine.encode(rendered, specials=False)[-3:]
