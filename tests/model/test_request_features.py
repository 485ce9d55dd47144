"""Stop tokens, ignore_eos, the samplers (min_p, typical_p, presence, frequency, logit_bias) and token-id
prompts, on the embedded model and through the wire.

The samplers' meaning is transformers' (its warpers, applied one row at a time, are the oracle) and
OpenAI's (presence and frequency penalties, logit_bias); each is checked on real model outputs, on
every core, and among other requests in one batch, where it must change nothing for the others.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from transformers import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from entity_llm_server import EngineRequest, LLMService, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingSettings, Finished, InvalidRequestError, Sampling
from entity_llm_server.engine import rows as r
from entity_llm_server.engine.sampling import GREEDY

from ..conftest import ServerThread
from ..engines import forced_forward, run, serving

pytestmark = pytest.mark.model

PROMPT = "def fibonacci(n):"
KINDS = ("batching", "sequential", "padded")


def load(kind: str, **settings):
    batching = BatchingSettings(max_batch_size=16, max_queue=16, **settings)
    return UnifiedLLMResource(engine=kind, batching=batching).load_engine()


@pytest.fixture(scope="module")
def engines():
    return {kind: load(kind) for kind in KINDS}


def outputs(engine, requests: list[EngineRequest], *, together: bool) -> list[Finished]:
    """Each request's Finished, served one after another or all at once."""

    async def main():
        if together:
            return [f for _, f, _ in await asyncio.gather(*(run(engine, r) for r in requests))]
        return [(await run(engine, r))[1] for r in requests]

    return serving(engine, main)


def request(prompt: str = PROMPT, n: int = 16, **sampling) -> EngineRequest:
    return EngineRequest(prompt, max_new_tokens=n, sampling=Sampling(**sampling))


# -- the meaning of each filter: transformers' warpers, row by row ---------------------------------


def test_the_filters_mean_what_transformers_warpers_mean_row_by_row():
    torch.manual_seed(0)
    vocab = 300
    logits = torch.randn(8, vocab) * 3
    # temperature, top_k, top_p, min_p, typical_p: each row its own, some filters off.
    params = [
        (1.0, 0, 1.0, 0.0, 1.0),
        (0.7, 0, 1.0, 0.1, 1.0),
        (1.3, 0, 1.0, 0.0, 0.5),
        (1.0, 50, 0.9, 0.05, 0.9),
        (0.5, 0, 0.8, 0.2, 1.0),
        (2.0, 10, 1.0, 0.0, 0.2),
        (1.0, 0, 1.0, 1.0, 1.0),  # min_p 1: the most likely token only
        (1.0, 0, 1.0, 0.0, 1e-6),  # the single most typical token only
    ]
    samplings = [Sampling(temperature=t, top_k=k, top_p=p, min_p=m, typical_p=y, seed=1) for t, k, p, m, y in params]
    rows = r.rows_for([r.row_values(x, 0, vocab) for x in samplings], [None] * 8, vocab, "cpu")
    ours = r.warp(logits, rows, r.eos_mask(frozenset(), vocab, "cpu"))
    for row, (t, k, p, m, y) in enumerate(params):
        scores = logits[row : row + 1].clone()
        warpers = [TemperatureLogitsWarper(t)]
        warpers += [TopKLogitsWarper(k)] if k else []
        warpers += [TopPLogitsWarper(p)] if p < 1 else []
        warpers += [MinPLogitsWarper(m)] if m else []
        warpers += [TypicalLogitsWarper(y)] if y < 1 else []
        for warper in warpers:
            scores = warper(torch.zeros((1, 1), dtype=torch.long), scores)
        expected = scores.log_softmax(dim=-1)[0]
        kept = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(ours[row]), kept), row
        assert torch.allclose(ours[row][kept], expected[kept], atol=1e-5), row
    assert int(torch.isfinite(ours[6]).sum()) == 1
    assert int(torch.isfinite(ours[7]).sum()) == 1
    assert int(torch.isfinite(ours[0]).sum()) == vocab


def test_filters_run_on_the_rows_that_use_them_and_leave_the_others_as_they_were():
    # The eager hook sorts (top-k/top-p) and filters (min-p/typical-p) only the rows that use them:
    # the same scores as running both over every row, for the rows that use them and the rest.
    torch.manual_seed(1)
    vocab = 300
    logits = torch.randn(6, vocab) * 3
    samplings = [
        GREEDY,
        Sampling(temperature=0.8, top_p=0.9, seed=1),
        Sampling(temperature=1.0, seed=2),
        Sampling(temperature=1.2, min_p=0.1, seed=3),
        GREEDY,
        Sampling(temperature=0.7, top_k=20, typical_p=0.8, seed=4),
    ]
    rows = r.rows_for([r.row_values(x, 0, vocab) for x in samplings], [None] * 6, vocab, "cpu")
    eos = r.eos_mask(frozenset(), vocab, "cpu")
    sort, filters = r.filtering(samplings)
    assert (sort, filters) == ([1, 5], [3, 5])
    everywhere = r.warp(logits, rows, eos)
    torch.testing.assert_close(r.warp(logits, rows, eos, sort=sort, filters=filters), everywhere)
    untouched = logits.float() / rows.temperature[:, None]
    torch.testing.assert_close(everywhere[[0, 2, 4]], untouched[[0, 2, 4]].log_softmax(-1))
    assert int(torch.isfinite(everywhere[1]).sum()) < vocab  # the selected rows were filtered
    # Noise too: drawn for the sampled rows only, the same draws as every row's noise masked.
    sampled = [i for i, x in enumerate(samplings) if x.sampled]
    torch.testing.assert_close(r.noisy(everywhere, rows, sampled), r.noisy(everywhere, rows))


def test_adjustments_add_the_bias_and_subtract_presence_and_frequency_penalties():
    sampling = Sampling(
        logit_bias=((3, 5.0), (9, -100.0)),
        presence_penalty=0.5,
        frequency_penalty=0.25,
        stop_token_ids=(11,),
        min_new_tokens=4,
    )
    row = torch.zeros(16)
    r.adjustments(sampling, 3, [3, 7, 7, 7], row)
    assert row[3] == 5.0 - 0.5 - 0.25  # biased, generated once
    assert row[7] == -0.5 - 3 * 0.25  # generated three times
    assert row[9] == -100.0
    assert row[11] == -math.inf  # a stop token, held off until min_new_tokens
    assert int((row != 0).sum()) == 4
    after = torch.zeros(16)
    r.adjustments(sampling, 4, [3, 7, 7, 7], after)
    assert after[11] == 0.0


# -- each sampler on the model ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_logit_bias_of_100_forces_a_token_and_minus_100_bans_one(engines, kind):
    engine = engines[kind]
    plain, forced = outputs(engine, [request(n=8), request(n=8, logit_bias=((42, 100.0),))], together=False)
    assert forced.token_ids == (42,) * 8
    first = plain.token_ids[0]
    (banned,) = outputs(engine, [request(n=8, logit_bias=((first, -100.0),))], together=False)
    assert banned.token_ids[0] != first
    assert first not in banned.token_ids


def test_min_p_of_1_is_greedy_and_typical_p_keeps_the_token_nearest_the_entropy(engines):
    engine = engines["batching"]
    greedy, min_p, *typical = outputs(
        engine,
        [
            request(n=12),
            request(n=12, temperature=1.0, seed=3, min_p=1.0, logprobs=True),
            request(n=1, temperature=1.0, seed=3, typical_p=1e-6),
            request(n=1, temperature=1.0, seed=4, typical_p=1e-6),
        ],
        together=False,
    )
    assert min_p.token_ids == greedy.token_ids
    # The most typical token: its surprise nearest the distribution's entropy (whatever the seed).
    ids = engine.tokenize(PROMPT).ids
    with torch.inference_mode():
        logp = engine.model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum()
    nearest = int((-logp - entropy).abs().argmin())
    assert [t.token_ids for t in typical] == [(nearest,), (nearest,)]
    assert nearest != greedy.token_ids[0]


def test_presence_and_frequency_penalties_lower_repeats_against_the_same_seed(engines):
    engine = engines["batching"]
    prompt = "a a a a a a a a a a"
    base = {"temperature": 0.7, "seed": 11}
    plain, presence, frequency = outputs(
        engine,
        [
            request(prompt, 32, **base),
            request(prompt, 32, **base, presence_penalty=2.0),
            request(prompt, 32, **base, frequency_penalty=2.0),
        ],
        together=False,
    )

    def repeats(ids: tuple[int, ...]) -> int:
        return len(ids) - len(set(ids))

    assert repeats(presence.token_ids) < repeats(plain.token_ids)
    assert repeats(frequency.token_ids) < repeats(plain.token_ids)
    # Only generated tokens count (OpenAI's meaning): the prompt's own "a" is not penalised.
    (negative,) = outputs(engine, [request(prompt, 32, **base, frequency_penalty=-2.0)], together=False)
    assert repeats(negative.token_ids) > repeats(plain.token_ids)


MIXED = [
    request(n=12),
    request(n=12, logit_bias=((42, 3.0), (7, -5.0))),
    request(n=12, temperature=0.9, seed=5, min_p=0.1),
    request(n=12, temperature=1.1, seed=6, typical_p=0.7, top_k=40),
    request("a a a a a", 12, presence_penalty=1.0, frequency_penalty=0.5, logprobs=True),
    request(n=12, temperature=0.8, seed=7, frequency_penalty=1.5, repetition_penalty=1.2, top_p=0.9),
    request("class Parser:", 12, stop_token_ids=(13,), min_new_tokens=3),
    request("import os\n", 12),
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_sampler_in_one_batch_changes_no_other_rows_tokens(engines, kind):
    engine = engines[kind]
    alone = outputs(engine, MIXED, together=False)
    together = outputs(engine, MIXED, together=True)
    assert [f.token_ids for f in together] == [f.token_ids for f in alone]
    assert len({f.token_ids for f in alone}) == len(MIXED)  # each request's own output


def test_graph_mode_applies_the_samplers_as_eager_mode_does(engines):
    # On a CPU the manager runs uncaptured, but the processors run their graph-mode code: the
    # additions to the logits come from a static buffer written before each step.
    graphs = load("batching", cuda_graphs=True)
    captured = outputs(graphs, MIXED, together=True)
    assert not graphs.batching.sampling.eager
    eager = outputs(engines["batching"], MIXED, together=True)
    assert [f.token_ids for f in captured] == [f.token_ids for f in eager]


# -- stopping -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_stop_token_ends_the_stream_with_its_own_reason(engines, kind):
    engine = engines[kind]
    (plain,) = outputs(engine, [request(n=16)], together=False)
    at = 4
    token = plain.token_ids[at]
    assert token not in plain.token_ids[:at]
    stopped, held = outputs(
        engine,
        [request(n=16, stop_token_ids=(token,)), request(n=16, stop_token_ids=(token,), min_new_tokens=at + 2)],
        together=False,
    )
    assert stopped.reason.value == "stop_token"
    assert stopped.stop_token_id == token
    assert stopped.token_ids == plain.token_ids[: at + 1]
    assert stopped.generated_tokens == at + 1
    assert stopped.tail_ids[-1:] == (token,)  # not text: it comes with the last message
    # Held off like EOS until min_new_tokens: the stop token cannot be chosen before then.
    assert token not in held.token_ids[: at + 2]
    assert held.reason.value in ("stop_token", "max_tokens")


@pytest.mark.parametrize("kind", ["batching", "padded"])
def test_ignore_eos_generates_to_max_new_tokens_past_eos(kind):
    engine = load(kind)
    eos = min(engine.eos_ids)
    forced_forward(engine, eos)  # the model now wants to end at every step
    plain, ignoring = outputs(engine, [request(n=8), request(n=8, ignore_eos=True)], together=False)
    assert (plain.reason.value, plain.token_ids) == ("eos", (eos,))
    assert ignoring.reason.value == "max_tokens"
    assert ignoring.token_ids == (eos,) * 8
    assert ignoring.stop_token_id is None


# -- token-id prompts -----------------------------------------------------------------------------------


def test_a_prompt_of_token_ids_is_the_same_as_its_text(engines):
    engine = engines["batching"]
    ids = engine.tokenize(PROMPT).ids
    text, by_ids, truncated = outputs(
        engine,
        [
            request(n=10),
            EngineRequest("", max_new_tokens=10, prompt_token_ids=ids),
            EngineRequest("", max_new_tokens=10, prompt_token_ids=ids, truncate_input_tokens=3),
        ],
        together=False,
    )
    assert by_ids.token_ids == text.token_ids
    assert by_ids.input_tokens == len(ids)
    assert truncated.input_tokens == 3


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt_token_ids": (5, 10**6)}, "prompt_token_ids[1]"),
        ({"sampling": Sampling(stop_token_ids=(1, 10**6))}, "stop_token_ids[1]"),
        ({"sampling": Sampling(logit_bias=((10**6, 1.0),))}, f"logit_bias[{10**6}]"),
    ],
)
def test_ids_outside_the_vocabulary_are_refused_naming_the_field_and_index(engines, fields, field):
    engine = engines["sequential"]
    with pytest.raises(InvalidRequestError) as caught:
        engine.prepare(EngineRequest("x" if "prompt_token_ids" not in fields else "", **fields))
    assert caught.value.field == field
    assert "is not a token id of this model" in str(caught.value)


# -- the wire ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    thread = ServerThread(LLMService(UnifiedLLMResource(default_max_new_tokens=8))).start()
    yield thread
    thread.stop()


def generate(server, **fields) -> list[llm_pb2.GenerateResponse]:
    async def call():
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            return [m async for m in stub.Generate(llm_pb2.GenerateRequest(**fields), timeout=60)]

    return server.call(call())


def test_the_new_fields_travel_the_wire(server):
    plain = generate(server, prompt=PROMPT, max_new_tokens=8)
    ids = [i for m in plain for i in m.token_ids]
    stop = ids[3]
    stopped = generate(server, prompt=PROMPT, max_new_tokens=8, stop_token_ids=[stop])
    assert stopped[-1].finish_reason == llm_pb2.FINISH_REASON_STOP_TOKEN
    assert stopped[-1].stop_token_id == stop
    assert stopped[-1].generated_token_count == 4
    assert [i for m in stopped for i in m.token_ids] == ids[:4]
    assert not plain[-1].HasField("stop_token_id")
    forced = generate(server, prompt=PROMPT, max_new_tokens=4, logit_bias={42: 100.0}, ignore_eos=True)
    assert [i for m in forced for i in m.token_ids] == [42] * 4
    prompt_ids = server.call(tokens(server, PROMPT))
    by_ids = generate(server, prompt_token_ids=prompt_ids, max_new_tokens=8)
    assert [i for m in by_ids for i in m.token_ids] == ids
    sampled = dict(temperature=1.0, seed=9, max_new_tokens=8, min_p=0.05, typical_p=0.9)
    penalised = dict(presence_penalty=0.5, frequency_penalty=0.5)
    first = generate(server, prompt=PROMPT, **sampled, **penalised)
    again = generate(server, prompt=PROMPT, **sampled, **penalised)
    # Text, not messages: under load a stream that falls behind gets several steps in one message.
    assert "".join(m.token for m in first) == "".join(m.token for m in again)


async def tokens(server, text: str) -> list[int]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        reply = await llm_pb2_grpc.LLMServiceStub(channel).Tokenize(llm_pb2.TokenizeRequest(text=text), timeout=30)
        return list(reply.token_ids)


BAD = [
    ({"min_p": 1.5}, "min_p", "must be between 0 and 1, got 1.5"),
    ({"typical_p": 0.0}, "typical_p", "must be in (0, 1], got 0"),
    ({"presence_penalty": 2.5}, "presence_penalty", "must be between -2 and 2, got 2.5"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty", "must be between -2 and 2, got nan"),
    ({"logit_bias": {7: 101.0}}, "logit_bias[7]", "must be between -100 and 100, got 101"),
    ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias", "at most 300 entries, got 301"),
    ({"stop_token_ids": list(range(17))}, "stop_token_ids", "at most 16, got 17"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids[0]", "1000000 is not a token id of this model"),
    ({"prompt": "", "prompt_token_ids": [1, 2, 99999]}, "prompt_token_ids[2]", "99999 is not a token id of this model"),
    ({"prompt_token_ids": [1]}, "prompt_token_ids", "send one of prompt, messages and prompt_token_ids, not prompt"),
    ({"ignore_eos": True, "regex": "[a-z]+"}, "ignore_eos", "cannot be combined with a constraint"),
]


def test_bad_values_of_the_new_fields_are_invalid_argument_naming_the_field(server):
    for fields, field, said in BAD:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            generate(server, **{"prompt": PROMPT, "max_new_tokens": 2, **fields})
        error = caught.value
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, fields
        assert f"{field}: {said}" in error.details(), error.details()
        (detail,) = rpc_status.from_call(error).details
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        assert field in [v.field for v in bad.field_violations]
    assert generate(server, prompt=PROMPT, max_new_tokens=2)[-1].generated_token_count == 2  # still serving
