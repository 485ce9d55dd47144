"""Padded batches on the model's own cache (`--engine padded`): requests that wait together share one batch."""

from __future__ import annotations

import asyncio

import pytest

from entity_llm_server import EngineRequest, UnifiedLLMResource, default_model_path
from entity_llm_server.engine import BatchingSettings, Finished, PaddedEngine, Sampling

from ..architectures import generate_ids
from ..conftest import wait_until

pytestmark = pytest.mark.model

# Prompts of different lengths, so that the batch pads them.
PROMPTS = ("x", "def f(x):", "import os\nimport sys\n", "class Parser:\n    def __init__(self", "# Copyright")
NEW_TOKENS = 8


def padded(folder) -> PaddedEngine:
    settings = BatchingSettings(max_batch_size=8, max_queue=8)
    engine = UnifiedLLMResource(folder, engine="padded", batching=settings).load_engine()
    assert isinstance(engine, PaddedEngine)
    return engine


async def _one_batch(engine: PaddedEngine, requests: list[EngineRequest]) -> tuple[list[Finished], int]:
    """Serve `requests` as one batch: they queue behind a long request, which then leaves.
    Their results, and the forward passes the core ran from the long request's cancel to the end."""
    await engine.start()
    try:
        core = engine.padded
        long = engine.generate(EngineRequest("def f(x):", max_new_tokens=200, sampling=Sampling(min_new_tokens=200)))
        await long.__anext__()  # the worker is busy with it

        async def one(request: EngineRequest) -> Finished:
            events = [e async for e in engine.generate(request)]
            assert isinstance(events[-1], Finished)
            return events[-1]

        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        assert await asyncio.to_thread(wait_until, lambda: core.state().held == len(requests) + 1, 30)
        before = core.state().steps
        await long.aclose()  # its cancel: dropped at the next step, and the waiting requests start together
        finals = await asyncio.gather(*tasks)
        return list(finals), core.state().steps - before
    finally:
        await engine.close()


@pytest.mark.parametrize("kind", ["demo", "gpt_neox", "opt", "bloom", "gpt2"])
def test_requests_that_wait_together_share_one_batch_and_stream_what_generate_gives(kind, tiny_model):
    # GPT-2 has absolute positions: a left-padded row must be given its own
    # (rotary models are blind to a shift; Bloom and OPT take them from the mask).
    folder = default_model_path() if kind == "demo" else tiny_model(kind)
    requests = [EngineRequest(p, max_new_tokens=NEW_TOKENS) for p in PROMPTS]
    finals, steps = asyncio.run(_one_batch(padded(folder), requests))
    assert [f.token_ids for f in finals] == [generate_ids(folder, p, NEW_TOKENS) for p in PROMPTS]
    # One batch: a prefill and 7 decode steps for all five (after the long
    # request's last step), where one at a time would take 5 x 8 passes.
    assert steps <= 2 + NEW_TOKENS, steps


def test_a_seed_gives_the_same_text_alone_and_in_a_padded_batch():
    sampled = Sampling(temperature=0.9, top_p=0.9, seed=77, logprobs=True, top_logprobs=2)
    alone, _ = asyncio.run(_one_batch(padded(default_model_path()), [EngineRequest("def f(x):", sampling=sampled)]))
    others = [EngineRequest(p, max_new_tokens=NEW_TOKENS) for p in PROMPTS]
    together, _ = asyncio.run(
        _one_batch(padded(default_model_path()), [*others, EngineRequest("def f(x):", sampling=sampled)])
    )
    assert together[-1].token_ids == alone[0].token_ids
    assert together[-1].seed == alone[0].seed == 77


@pytest.mark.parametrize("kind", ["demo", "gpt2", "bloom"])
def test_rows_whose_requests_ended_leave_the_batch_and_the_others_stream_on_unchanged(kind, tiny_model):
    # Lengths 2 to 16 in one batch: as requests end, the batch (its cache too) keeps only
    # the rows still generating; each row keeps its own positions and mask.
    folder = default_model_path() if kind == "demo" else tiny_model(kind)
    lengths = (2, 3, 5, 9, 16)
    engine = padded(folder)
    rows: list[int] = []
    forward = engine.model.forward

    def counting(*args, **kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    engine.model.forward = counting
    requests = [EngineRequest(p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths, strict=True)]
    finals, _ = asyncio.run(_one_batch(engine, requests))
    assert [f.token_ids for f in finals] == [generate_ids(folder, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    batch = rows[rows.index(5) :]  # the shared batch's passes (the long request ran alone before)
    assert batch == sorted(batch, reverse=True)
    assert batch[-1] < 5, batch  # it shrank as requests ended
