"""Every causal LM, not most: the start-up probe proves continuous batching on the model, or the server
falls back to an engine that runs it (tiny random-weight models of several architectures)."""

from __future__ import annotations

import asyncio

import pytest

from entity_llm_server import EngineRequest, UnifiedLLMResource
from entity_llm_server.engine import Finished
from entity_llm_server.engine.process import ProcessEngine
from entity_llm_server.resource import ModelLoadError

from ..architectures import EXPECTED, build_remote_code, build_sentencepiece_only, generate_ids

pytestmark = pytest.mark.model

PROMPTS = ("def f(x):", "import os\n", "class Parser:", "# Copyright")
NEW_TOKENS = 8


async def _serve(resource: UnifiedLLMResource) -> tuple[str, list[tuple[int, ...]]]:
    """The engine `resource` serves with, and the greedy ids of every prompt, all at once."""
    engine = await resource.engine()
    try:

        async def one(prompt: str) -> tuple[int, ...]:
            events = [e async for e in engine.generate(EngineRequest(prompt, max_new_tokens=NEW_TOKENS))]
            assert isinstance(events[-1], Finished)
            return events[-1].token_ids

        return engine.info().engine, list(await asyncio.gather(*(one(p) for p in PROMPTS)))
    finally:
        await resource.close()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_auto_serves_every_architecture_with_an_engine_that_runs_it(kind, tiny_model, capfd, caplog):
    # As the console script serves it by default: `--engine auto` in an engine
    # process, which makes the choice itself and logs it to the stderr it
    # shares with us. The architectures continuous batching runs go through the
    # same BatchingCore in this process (an engine process each would add a
    # minute to the suite; the demo model, a Llama, covers that path end to end).
    folder = tiny_model(kind)
    expected, architecture = EXPECTED[kind]
    in_process = expected == "batching" and kind != "llama"
    resource = UnifiedLLMResource(folder, engine_process=not in_process, log_level="WARNING")
    with caplog.at_level("WARNING", logger="entity_llm_server.resource"):
        engine, served = asyncio.run(_serve(resource))
    assert engine == expected
    assert served == [generate_ids(folder, p, NEW_TOKENS) for p in PROMPTS]
    logged = capfd.readouterr().err.splitlines() + [r.getMessage() for r in caplog.records]
    fallbacks = [line for line in logged if "continuous batching cannot run" in line]
    if expected == "padded":
        # One line that names the architecture, the reason and what serves instead.
        assert len(fallbacks) == 1, fallbacks
        assert f"continuous batching cannot run {architecture}: " in fallbacks[0]
        assert fallbacks[0].endswith("serving it in padded batches on the model's own cache (--engine padded)")
    else:
        assert fallbacks == []


def test_batching_asked_for_explicitly_is_a_start_up_error_naming_the_architecture(tiny_model):
    with pytest.raises(ModelLoadError) as caught:
        asyncio.run(_serve(UnifiedLLMResource(tiny_model("gpt_neox"), engine="batching")))
    message = str(caught.value)
    assert message.startswith("continuous batching cannot run GPTNeoXForCausalLM: ")
    assert "PagedAttentionCache" in message  # transformers' own reason


def test_in_process_the_front_end_falls_back_and_says_so_once(tiny_model, caplog):
    folder = tiny_model("opt")
    with caplog.at_level("WARNING", logger="entity_llm_server.resource"):
        engine, served = asyncio.run(_serve(UnifiedLLMResource(folder)))
    assert engine == "padded"
    assert served == [generate_ids(folder, p, NEW_TOKENS) for p in PROMPTS]
    fallbacks = [r.getMessage() for r in caplog.records if "continuous batching cannot run" in r.getMessage()]
    assert len(fallbacks) == 1
    assert fallbacks[0].startswith("continuous batching cannot run OPTForCausalLM: ")


def test_padded_batches_asked_for_run_in_engine_processes_replicas_too(tiny_model):
    # A model continuous batching runs (Llama), so the padded batches are the request, not a fallback.
    folder = tiny_model("llama")
    resource = UnifiedLLMResource(folder, engine="padded", engine_process=True, engine_replicas=2)

    async def main() -> tuple[str, list[tuple[int, ...]]]:
        engine = await resource.engine()
        assert isinstance(engine, ProcessEngine)
        assert [child.engine for child in engine.children] == ["padded", "padded"]
        return await _serve(resource)

    engine, served = asyncio.run(main())
    assert engine == "padded"
    assert served == [generate_ids(folder, p, NEW_TOKENS) for p in PROMPTS]


def test_a_folder_with_its_own_modeling_code_loads_only_when_trusted(tmp_path):
    folder = build_remote_code(tmp_path / "custom")
    with pytest.raises(ModelLoadError) as refused:
        asyncio.run(_serve(UnifiedLLMResource(folder)))
    assert "start the server with --trust-remote-code" in str(refused.value)
    engine, served = asyncio.run(_serve(UnifiedLLMResource(folder, trust_remote_code=True)))
    assert engine == "batching"
    assert served == [generate_ids(folder, p, NEW_TOKENS, trust_remote_code=True) for p in PROMPTS]
    # The engine process loads it the same way.
    engine, again = asyncio.run(_serve(UnifiedLLMResource(folder, trust_remote_code=True, engine_process=True)))
    assert (engine, again) == ("batching", served)


def test_a_sentencepiece_only_tokenizer_is_converted_to_a_fast_one(tmp_path):
    folder = build_sentencepiece_only(tmp_path / "sp")
    assert not (folder / "tokenizer.json").exists()
    engine, served = asyncio.run(_serve(UnifiedLLMResource(folder)))
    assert engine == "batching"
    assert served == [generate_ids(folder, p, NEW_TOKENS) for p in PROMPTS]
    assert all(served)
